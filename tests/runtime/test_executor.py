"""The one-device executor: plans run as specified, selective computation, guidance, prompt switches.

pytest tests/runtime/test_executor.py
"""

import dataclasses

import pytest
import torch

from engine.models.rope import Rope
from engine.plan.sigmas import build_schedule
from engine.plan.timeline import Tick, make_work
from engine.runtime.executor import Executor, StreamSetup
from engine.runtime.session import Session
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import SelfForcingSolver
from engine.weight_paths import WeightPaths
from helpers import TINY, assert_close, tiny_cache, tiny_model
from launch.build import build_session
from launch.presets import get_preset

CPU = torch.device("cpu")


def _pipeline(name: str, **changes) -> Session:
    preset = get_preset(name)
    parts = {k: dataclasses.replace(getattr(preset, k), **v) for k, v in changes.items()}
    return build_session(dataclasses.replace(preset, **parts), WeightPaths(seed=3), CPU, torch.float32)


def _video(pipeline: Session, blocks: int, prompt="a red circle moving left", seed=0) -> torch.Tensor:
    return torch.cat([b.latents for b in pipeline.run(prompt, blocks=blocks, seed=seed)], dim=2)


@torch.no_grad()
def test_sequential_plan_reproduces_self_forcings_loop():
    """Through the executor, Self-Forcing gives exactly what its own loop gives."""
    pipeline = _pipeline("tiny-wan")
    preset, model = pipeline.preset, pipeline.model
    schedule, noise, F = pipeline.schedule, NoiseSource(5), preset.stream.frames_per_block
    cache, text = pipeline.executors(noise, blocks_in_forward=1).cache, pipeline.prompts.conditioning("a blue square")
    expected = []
    for b in range(4):  # Self-Forcing's loop, written out
        x = noise.noise(preset.latent_shape(F), b, 0)
        for step in range(schedule.steps):
            view = cache.view(first_frame=b * F, frames=F, block_frames=F, mode="causal")
            sigma = torch.full((1, F), schedule.sigmas[step], dtype=torch.float64)
            x0 = x - schedule.sigmas[step] * model(x, sigma, text, view)
            x = (
                x0
                if step + 1 == schedule.steps
                else (
                    (1 - schedule.sigmas[step + 1]) * x0 + schedule.sigmas[step + 1] * noise.noise(x.shape, b, step + 1)
                )
            )
        view = cache.view(first_frame=b * F, frames=F, block_frames=F, mode="causal", commit_frames=F)
        model(x0, torch.zeros(1, F, dtype=torch.float64), text, view)
        view.commit()
        expected.append(x0)
    actual = [b.latents for b in pipeline.run("a blue square", blocks=4, seed=5)]
    for b, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, 1e-6, f"block {b}")


@pytest.mark.parametrize("schedule", ["pyramid", "skyreels"])
def test_selective_equals_whole_window_with_causal_attention(schedule):
    """With causal attention, computing only the blocks with work (finished ones through their
    committed K/V) gives the whole-window result: here with guidance, fps, UniPC, 8 blocks."""
    plan = dict(schedule=schedule, offset=1, attention="causal", segment_frames=None, overlap_frames=0)
    stream = dict(window_frames=64)  # no eviction: both modes see every earlier block
    window = _video(_pipeline("skyreels-v2-df-tiny", plan={**plan, "compute": "window"}, stream=stream), 8)
    selective = _video(_pipeline("skyreels-v2-df-tiny", plan={**plan, "compute": "selective"}, stream=stream), 8)
    assert_close(selective, window, 1e-5, f"{schedule}: selective vs whole window")


def test_selective_is_an_approximation_with_bidirectional_attention():
    plan = dict(schedule="skyreels", offset=1, attention="bidirectional", segment_frames=None, overlap_frames=0)
    window = _video(_pipeline("skyreels-v2-df-tiny", plan={**plan, "compute": "window"}), 6)
    selective = _video(_pipeline("skyreels-v2-df-tiny", plan={**plan, "compute": "selective"}), 6)
    difference = (selective - window).abs().max().item()
    assert torch.isfinite(selective).all() and 1e-4 < difference, f"max difference {difference}"


@torch.no_grad()
def test_batched_guidance_equals_two_forwards():
    """[cond, uncond] in one batch, each with its own committed K/V, equals two separate streams."""
    model, grid, F = tiny_model(), (2, 2), 2
    generator = torch.Generator().manual_seed(0)
    cond = model.embed_text(torch.randn(1, 8, TINY.text_dim, generator=generator))
    uncond = model.embed_text(torch.zeros(1, 8, TINY.text_dim))
    both = type(cond).stack(cond, uncond)
    caches = {
        "both": tiny_cache(TINY, grid, sink=0, ring=8, scratch=F, batch=2),
        "cond": tiny_cache(TINY, grid, sink=0, ring=8, scratch=F),
        "uncond": tiny_cache(TINY, grid, sink=0, ring=8, scratch=F),
    }
    for b in range(3):
        x = torch.randn(1, TINY.in_channels, F, 4, 4, generator=generator)
        sigma = torch.rand(1, F, generator=generator)
        flows = {}
        for name, text, inputs in (
            ("both", both, (torch.cat([x, x]), torch.cat([sigma, sigma]))),
            ("cond", cond, (x, sigma)),
            ("uncond", uncond, (x, sigma)),
        ):
            view = caches[name].view(first_frame=b * F, frames=F, block_frames=F, mode="causal", commit_frames=F)
            flows[name] = model(*inputs, text, view)
            view.commit()
        assert_close(flows["both"], torch.cat([flows["cond"], flows["uncond"]]), 1e-5, f"block {b}")


def test_prompt_switch_takes_effect_at_the_next_tick():
    pipeline = _pipeline("tiny-wan")
    switch_tick = 10  # block 2 starts at tick 10 (5 ticks per block)
    same = _video(pipeline, 4, prompt="a red circle")
    switched = torch.cat(
        [
            b.latents
            for b in pipeline.run(
                lambda tick: "a red circle" if tick.index < switch_tick else "a green triangle", blocks=4, seed=0
            )
        ],
        dim=2,
    )
    F = pipeline.preset.stream.frames_per_block
    assert torch.equal(switched[:, :, : 2 * F], same[:, :, : 2 * F])
    assert not torch.allclose(switched[:, :, 2 * F :], same[:, :, 2 * F :])


def test_blocks_are_yielded_as_soon_as_done():
    pipeline = _pipeline("skyreels-v2-df-tiny", plan=dict(schedule="pyramid", offset=1, compute="selective"))
    executor = pipeline.executors(NoiseSource(0), blocks_in_forward=pipeline.schedule.steps + 1)
    finished_at = [executor.stats.forwards for _ in executor.run(pipeline.plan(4), pipeline.prompts.conditioning("x"))]
    steps = pipeline.schedule.steps
    assert finished_at == [steps + b for b in range(4)]  # block b's last step is at tick b + steps - 1


def _bare_executor(compute="selective") -> Executor:
    schedule = build_schedule(get_preset("tiny-wan").sampling)
    noise = NoiseSource(0)
    setup = StreamSetup(
        schedule=schedule,
        solver=SelfForcingSolver(schedule, noise),
        noise=noise,
        block_shape=(1, 4, 3, 4, 4),
        rope=Rope(TINY, (2, 2)),
        compute=compute,
    )
    cache = tiny_cache(TINY, (2, 2), sink=0, ring=9, scratch=9) if compute == "selective" else None
    return Executor(tiny_model(), setup, cache)


def test_malformed_plans_are_refused():
    schedule, text = build_schedule(get_preset("tiny-wan").sampling), tiny_model().embed_text(torch.zeros(1, 4, 32))
    gap = Tick(0, (make_work(schedule, 0, 0), make_work(schedule, 2, 0)), (0, 3))
    with pytest.raises(ValueError, match="consecutive"):
        list(_bare_executor().run([gap], text))
    late_commit = Tick(0, (make_work(schedule, 0, 0), make_work(schedule, 1, schedule.steps)), (0, 2))
    with pytest.raises(ValueError, match="precede"):
        list(_bare_executor().run([late_commit], text))
    outside = Tick(0, (make_work(schedule, 3, 0),), (0, 2))
    with pytest.raises(ValueError, match="outside the window"):
        list(_bare_executor("window").run([outside], text))
    with pytest.raises(ValueError, match="needs a KV cache"):
        rope = Rope(TINY, (2, 2))
        Executor(
            tiny_model(),
            StreamSetup(schedule=schedule, solver=None, noise=None, block_shape=(1, 4, 3, 4, 4), rope=rope),
            None,
        )


def test_pyramid_blocks_see_their_predecessors_in_flight():
    """Under a pyramid, block 1 starts from block 0's partially denoised context (the premise of
    Block Cascading), so it differs from sequential generation; block 0, which sees nothing later
    under causal attention, does not."""
    F = get_preset("tiny-wan").stream.frames_per_block
    seq = _video(_pipeline("tiny-wan", plan=dict(schedule="sequential")), 3)
    pyr = _video(_pipeline("tiny-wan", plan=dict(schedule="pyramid", offset=2)), 3)
    assert_close(pyr[:, :, :F], seq[:, :, :F], 1e-6, "block 0, pyramid vs sequential")
    assert (pyr[:, :, F:] - seq[:, :, F:]).abs().max() > 1e-4


def test_lagged_context_without_neighbours_is_sequential():
    """With offset steps + 1 no block is ever in flight beside another: lagged changes nothing."""
    steps = get_preset("tiny-wan").sampling.steps
    seq = _video(_pipeline("tiny-wan", plan=dict(schedule="sequential")), 3)
    lagged = _video(_pipeline("tiny-wan", plan=dict(schedule="cascade", offset=steps + 1, context="lagged")), 3)
    assert_close(lagged, seq, 1e-6, "lagged, offset steps+1, vs sequential")


@torch.no_grad()
def test_recache_rewrites_the_window_as_fresh_commits_would():
    """After a recache the window's K/V equal committing the same clean latents block by block
    under the new prompt from an empty cache starting at the window."""
    pipeline = _pipeline("tiny-wan", stream=dict(sink_frames=0), plan=dict(switch="recache"))
    F, old, new = 3, pipeline.prompts.conditioning("a red circle"), pipeline.prompts.conditioning("a blue square")
    executor = pipeline.executors(NoiseSource(0), blocks_in_forward=1)
    list(executor.run(pipeline.plan(4), old))
    frames = executor.cache.visible_frame_ids()
    assert frames == list(range(6, 12))
    executor.switch.recache(executor, new)
    reference = pipeline.executors(NoiseSource(0), blocks_in_forward=1).cache
    reference.reset(origin=6)
    for block in (2, 3):
        view = reference.view(first_frame=block * F, frames=F, block_frames=F, mode="causal", commit_frames=F)
        pipeline.model(executor.switch.history[block], torch.zeros(1, F, dtype=torch.float64), new, view)
        view.commit()
    T = reference.T
    for cache in (executor.cache, reference):
        assert cache.visible_frame_ids() == frames
    ours = [executor.cache.k[:, :, executor.cache.slot_of(f) * T : (executor.cache.slot_of(f) + 1) * T] for f in frames]
    theirs = [reference.k[:, :, reference.slot_of(f) * T : (reference.slot_of(f) + 1) * T] for f in frames]
    assert_close(torch.cat(ours, 2), torch.cat(theirs, 2), 1e-5, "recached keys")


def test_recache_waits_for_the_next_block():
    plan = dict(switch="recache")
    pipeline = _pipeline("tiny-wan", stream=dict(sink_frames=0), plan=plan)
    before = _video(pipeline, 4, prompt="a red circle")
    run = pipeline.run(lambda tick: "a red circle" if tick.index < 12 else "a blue square", blocks=4, seed=0)
    switched = torch.cat([b.latents for b in run], dim=2)
    assert torch.equal(switched[:, :, :9], before[:, :, :9]), "block 2 started under the old prompt and keeps it"
    assert not torch.allclose(switched[:, :, 9:], before[:, :, 9:])
    assert run.stats.forwards == 4 * 5 + 1 and run.stats.recaches == 1, "one recache forward"
