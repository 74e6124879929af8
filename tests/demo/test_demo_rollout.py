"""Training the demo model on its own rollouts: the streams, their ground truth, exact resume.

pytest tests/demo/test_demo_rollout.py
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine.demo.continuation import read_background, reanchor, render_block, start_scene
from engine.demo.pixels import PatchCodec
from engine.demo.rollout import RolloutView, refined, rollout_loss
from engine.demo.scenes import make_clip
from engine.demo.trainer import Trainer
from engine.demo.training import TrainConfig, color_readout, flow_error, pyramid_sigmas, switch_boost
from engine.models.attention import LocalView
from launch.presets import get_preset

DEMO = get_preset("demo")
TINY = dataclasses.replace(
    DEMO,
    model=dataclasses.replace(DEMO.model, dim=32, ffn_dim=64, num_heads=2, num_layers=2),
    stream=dataclasses.replace(DEMO.stream, height=32, width=32),
)
TINY_CFG = TrainConfig(steps=4, batch=1, warmup=1, codec_clips=4, bf16=False, rollout_streams=3,
                       rollout_min_blocks=1, rollout_max_blocks=2, rollout_switch=0.5)  # fmt: skip
STAGE4_CFG = dataclasses.replace(TINY_CFG, color_weight=2.0, switch_weight=3.0, prefix_blocks=2, pyramid_share=0.5)
TEACHER_CFG = dataclasses.replace(TINY_CFG, timesteps=(1000.0, 750.0, 500.0, 250.0, 100.0),
                                  teacher_timesteps=(1000.0, 500.0, 250.0, 100.0, 20.0), teacher_share=0.5)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than several, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_scene_continues_block_by_block_and_reanchors_to_what_is_shown():
    scene = start_scene(np.random.default_rng(3), 64, centred=True)
    whole, _ = render_block(scene, 6, 64)
    first, middle = render_block(scene, 3, 64)
    second, _ = render_block(middle, 3, 64)
    assert np.array_equal(whole, np.concatenate([first, second]))
    assert np.abs(middle.position - 32).max() < 2 + 3 * 2.0 + 1e-6, "a stream starts near the centre"
    moved = dataclasses.replace(middle, position=np.array([10.0, 50.0]))
    shown, _ = render_block(moved, 1, 64)
    read = reanchor(middle, shown[-1])
    expected = (moved.position + moved.velocity) % 64  # the frame rendered after `moved`
    assert np.abs(read.position - expected).max() < 0.5
    assert reanchor(middle, np.zeros_like(shown[-1])).position is middle.position, "no shape: keep the scene"


def test_the_background_is_read_back_from_frames():
    rng = np.random.default_rng(0)
    for _ in range(8):
        scene = start_scene(rng, 64, centred=False)
        frames, _ = render_block(scene, 3, 64)
        assert read_background(frames) == scene.background
    clip = make_clip(np.random.default_rng(1), frames=3)
    assert 0 <= read_background(clip.frames) < 4


def test_the_rollout_view_equals_a_block_causal_forward_over_the_window():
    """Committed K/V (commit passes, as inference writes them) + the block's own: the same as one
    block-causal forward over the context and the block, while the window holds them all."""
    torch.manual_seed(0)
    trainer = Trainer(TINY, dataclasses.replace(TINY_CFG, rollout_streams=1, own_start=1.0), torch.device("cpu"))
    model, pool = trainer.model.eval(), trainer.pool
    latents = torch.randn(1, 16, 9, 8, 8)  # [B, C, F, h, w]: three blocks
    sigma = torch.tensor([[0.0] * 6 + [0.8] * 3])  # two committed blocks, then one being denoised
    with torch.no_grad():
        text = trainer._text(["a red circle moving left"])
        for block in range(2):
            commit = pool.view(record=True)
            model(latents[:, :, 3 * block : 3 * block + 3], sigma[:, :3], text, commit)
            pool.append([k for k, _ in commit.recorded], [v for _, v in commit.recorded], [0])
        whole = model(latents, sigma, text, LocalView(trainer.rope, 0, 9, 3, "causal"))
        alone = model(latents[:, :, 6:], sigma[:, 6:], text, pool.view())
    assert isinstance(pool.view(), RolloutView) and pool.visible.all()
    torch.testing.assert_close(alone, whole[:, :, 6:], atol=1e-5, rtol=1e-4)


def test_the_teacher_is_the_long_sampler_run_on_the_trained_input():
    """`refined`: a stream at the ladder's lowest level gets the one-jump x0 prediction; one at
    sigma 1 gets x0 prediction, re-noise and predict again at every level of the ladder, exactly
    as the sampler would with that ladder; the trainer's own ladder is the teacher steps' warp."""
    trainer = Trainer(TINY, TEACHER_CFG, torch.device("cpu"))
    assert trainer.sigmas[:-1] == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.3571428], rel=1e-5)
    _, _, ladder = trainer.teacher
    assert ladder[-1] == 0 and len(ladder) == 6
    model, pool = trainer.model.eval(), trainer.pool
    x = torch.randn(3, 16, 3, 8, 8)  # [B, C, F, h, w]: a block of each of the 3 streams (32x32 video)
    sigma = torch.tensor([ladder[-2], 1.0, 0.5])
    with torch.no_grad():
        text = trainer._text(["a red circle moving left"] * 3)
        got = refined(model, text, pool.view(), x, sigma, ladder, torch.Generator().manual_seed(5))
        generator, B = torch.Generator().manual_seed(5), 3  # every level for all: stream 1 goes through them all
        x0 = x - sigma[:, None, None, None, None] * model(x, sigma[:, None].expand(B, 3), text, pool.view())
        assert torch.equal(got[0], x0[0]), "at the lowest level the teacher is the one-jump prediction"
        for level in ladder[1:-1]:
            noisy = (1 - level) * x0 + level * torch.randn(x0.shape, generator=generator)
            x0 = noisy - level * model(noisy, torch.full((B, 3), level), text, pool.view())
    difference = (got[1] - x0[1]).abs()
    assert torch.allclose(got[1], x0[1], atol=1e-6), f"max {difference.max():.3g}, mean {difference.mean():.3g}"
    assert not torch.allclose(got[1], got[0], atol=1e-3)


def test_the_teachers_target_holds_only_where_it_is_asked_to():
    """rollout_loss with a teacher: pixels outside `where` keep the ground truth as their target
    (the loss equals the teacher-free one exactly), pixels inside take the teacher's."""
    trainer = Trainer(TINY, TEACHER_CFG, torch.device("cpu"))
    model, pool = trainer.model.eval(), trainer.pool
    truth = torch.randn(3, 16, 3, 8, 8)  # [B, C, F, h, w]
    inputs, weights = [torch.randn_like(truth) for _ in trainer.sigmas[:-1]], torch.ones(3, 3, 8, 8)
    far_off = (lambda x, sigma: truth + 100.0, 1.0)  # a teacher whose target is far from the truth

    def loss(teacher):
        with torch.no_grad():
            text = trainer._text(["a red circle moving left"] * 3)
            return rollout_loss(model, text, pool, truth, inputs, weights, trainer.sigmas,
                                torch.Generator().manual_seed(3), None, teacher)  # fmt: skip

    nowhere, everywhere = torch.zeros(3, 1, 3, 8, 8, dtype=torch.bool), torch.ones(3, 1, 3, 8, 8, dtype=torch.bool)
    assert torch.equal(loss((*far_off, nowhere)), loss(None))
    assert loss((*far_off, everywhere)) > 100 * loss(None)


def test_the_teacher_is_a_moving_average_of_the_trained_weights():
    """A mean teacher: each rollout step moves it 1 - ema of the way to the trained weights, from
    the first step on (no warm-up: it lags the trained weights)."""
    cfg = dataclasses.replace(TEACHER_CFG, ema=0.75)
    trainer = Trainer(TINY, cfg, torch.device("cpu"))
    teacher, words, _ = trainer.teacher
    taught = [*teacher.parameters(), *words.module.parameters()]
    trainer.train_step()  # moves the teacher once, then trains
    before, trained = [p.clone() for p in taught], [p.detach().clone() for p in trainer.params]
    assert not all(torch.equal(p, new) for p, new in zip(before, trained)), "the teacher lags the trained weights"
    trainer._teacher(["a red circle moving left"] * 3)
    for p, old, new in zip(taught, before, trained):
        torch.testing.assert_close(p, old + 0.25 * (new - old))


def _trained(steps: int, resume_after: int | None, tmp_path, cfg=TINY_CFG) -> Trainer:
    trainer = Trainer(TINY, cfg, torch.device("cpu"))
    for _ in range(steps if resume_after is None else resume_after):
        trainer.train_step()
    if resume_after is not None:
        trainer.save(tmp_path / "checkpoint.pt")
        trainer = Trainer(TINY, cfg, torch.device("cpu"))
        trainer.load(tmp_path / "checkpoint.pt")
        for _ in range(steps - resume_after):
            trainer.train_step()
    return trainer


@pytest.mark.parametrize(
    "cfg",
    [TINY_CFG, STAGE4_CFG, TEACHER_CFG, dataclasses.replace(TEACHER_CFG, teacher_region="shape")],
    ids=["stage3", "color-switch-prefix", "teacher", "teacher-on-the-shape"],
)
def test_training_resumes_bit_for_bit(tmp_path, cfg):
    straight = _trained(4, None, tmp_path, cfg)
    resumed = _trained(4, 2, tmp_path, cfg)
    assert resumed.step == straight.step == 4
    assert len(straight.losses["rollout"]) == 4
    for a, b in zip(straight.params, resumed.params):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    assert torch.equal(straight.pool.keys, resumed.pool.keys)
    assert straight.losses == resumed.losses
    assert straight.rng.random() == resumed.rng.random()
    assert straight.pool.since_switch == resumed.pool.since_switch
    fresh = Trainer(TINY, cfg, torch.device("cpu"))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.params, straight.params)), "training changed nothing"


def test_the_training_command_never_writes_the_shipped_weights_by_default():
    from launch.train_demo import parse_args

    args = parse_args([])
    assert args.out.as_posix() == "out/demo-train" and not args.resume
    assert "engine/weights" not in args.out.as_posix()


def _patch_means(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """`[B, 3, F, H, W]` -> the mean RGB of every patch `[B, 3, F, H/p, W/p]`."""
    B, C, F, H, W = pixels.shape
    return pixels.reshape(B, C, F, H // patch, patch, W // patch, patch).mean(dim=(4, 6))


def test_the_color_readout_is_the_decoded_patch_color_and_costs_its_weight():
    codec = PatchCodec.random(4, 16, seed=0)  # decodes latent 0 to gray 0: small deltas never clamp
    delta = 0.05 * torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    decoded = _patch_means(codec.decode(delta) - codec.decode(torch.zeros_like(delta)), 4)  # [B, 3, F, h, w]
    colors = color_readout(codec, 2.0)
    read = torch.einsum("ck,bkfhw->bcfhw", colors, delta)
    scale = read / decoded
    print(f"scale min {scale.min():.6f} max {scale.max():.6f}")
    assert torch.allclose(scale, scale.flatten()[0].expand_as(scale), rtol=1e-3), "not the patch color up to one scale"
    assert abs(colors.pow(2).sum().item() - 2.0) < 1e-5
    assert color_readout(codec, 0.0) is None


def test_the_color_term_costs_a_darker_shape_more_than_an_equal_colorless_error():
    codec = PatchCodec.random(4, 16, seed=0)
    colors = color_readout(codec, 4.0)
    darker = torch.linalg.pinv(colors) @ torch.tensor([-1.0, -1.0, -1.0])  # [k]: every patch darker, nothing else
    colorless = torch.randn(16, generator=torch.Generator().manual_seed(2))
    colorless -= torch.linalg.pinv(colors) @ (colors @ colorless)  # no change of any patch's mean color
    colorless *= darker.norm() / colorless.norm()
    target = torch.zeros(1, 16, 3, 2, 2)
    as_error = lambda d, c: flow_error(target + d.view(1, 16, 1, 1, 1), target, c).mean().item()  # noqa: E731
    assert as_error(darker, None) == pytest.approx(as_error(colorless, None))
    assert as_error(colorless, colors) == pytest.approx(as_error(colorless, None), abs=1e-6)
    dark, flat = as_error(darker, colors), as_error(colorless, colors)
    assert dark > 2 * flat, (dark, flat)


def test_the_two_blocks_from_a_switch_are_weighted_up():
    boost = switch_boost([["a", "a", "b", "b", "b"], ["a", "a", "a", "a", "a"], ["a", "b", "c", "c", "c"]], 3.0)
    assert boost.tolist() == [[1, 1, 4, 4, 1], [1, 1, 1, 1, 1], [1, 4, 4, 4, 1]]


def test_pyramid_clips_hold_the_context_a_pyramid_forward_holds():
    levels = (1.0, 0.75, 0.5, 0.25, 0.0)
    sigma = pyramid_sigmas(torch.full((64, 9), 0.6), levels, 3, 1.0, torch.Generator().manual_seed(0))
    blocks = sigma[:, ::3]  # [B, 3]
    assert torch.equal(sigma, blocks.repeat_interleave(3, dim=1)), "a block has one level"
    assert all(b in levels for b in blocks.flatten().tolist())
    assert (blocks[:, -1] > 0).all(), "the last block is still being denoised"
    assert (blocks[:, :-1] <= blocks[:, 1:]).all(), "earlier blocks are further on"
    assert (blocks[:, 1] > 0).any() and (blocks[:, 0] == 0).any(), "partly denoised and committed context both occur"
    kept = pyramid_sigmas(torch.full((64, 9), 0.6), levels, 3, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept, torch.full((64, 9), 0.6))


def test_stop_at_ends_a_run_early_on_its_full_schedule(tmp_path):
    """--stop-at N writes step N's weights of a --steps run (so a card can name a mid-run checkpoint exactly)."""
    from launch.train_demo import main

    argv = ["--steps", "6", "--stop-at", "2", "--batch", "2", "--codec-clips", "8", "--checkpoint-minutes", "0",
            "--threads", "1", "--no-bf16", "--log-every", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["step"] == 2 and record["config"]["steps"] == 6
    assert "--stop-at 2" in record["command"]
    assert (tmp_path / "transformer.safetensors").exists()


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--teacher-share", "1.5", "--teacher-timesteps", "1000", "500"], "--teacher-share is a share"),
        (["--teacher-share", "1"], "--teacher-share needs a teacher"),
        (["--own-input", "-0.1"], "--own-input is a share"),
        (["--ema", "1"], "--ema is a decay"),
        (["--stop-at", "-5"], "--stop-at is a step"),
    ],
)
def test_out_of_range_training_flags_are_one_line_errors(flags, said, tmp_path, capsys):
    from launch.train_demo import main

    assert main([*flags, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(tmp_path.iterdir()), "nothing trained or written"
