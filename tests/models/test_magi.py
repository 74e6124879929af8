"""MAGI-1: released sizes, the chunk window against the reference's stage table, KV commits, the
network's conventions (rotary layout, projection interleave, per-chunk captions, GQA), guidance
tables, feature caching and the CLI.

    pytest tests/models/test_magi.py
"""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.config import CacheConfig, MagiConfig, MagiGuidance, SamplingConfig
from engine.devices import SetupError
from engine.families.magi import init_magi_random_
from engine.loading import build_decoder, build_special_tokens
from engine.models.attention import LocalView
from engine.models.magi import CaptionKV, MagiModel, MagiText, interleave_heads
from engine.models.magi_rope import MagiRope
from engine.models.magi_tokens import SpecialTokens
from engine.plan.sigmas import build_schedule, magi_times
from engine.plan.timeline import pyramid
from engine.sampling.magi_guidance import MagiGuidance as Guidance
from engine.sampling.magi_guidance import step_size
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.presets import get_preset, parameter_count

TINY = get_preset("magi-1-tiny")


def test_parameter_counts_match_the_released_sizes():
    """Counted on the meta device: ~4.4B (34 layers of ~130M) and ~23.9B (48 layers of ~497M)."""
    small, large = parameter_count(get_preset("magi-1-4.5b")), parameter_count(get_preset("magi-1-24b"))
    assert 4.40e9 < small < 4.50e9, small
    assert 23.8e9 < large < 24.0e9, large
    assert parameter_count(get_preset("magi-1-24b-distill")) == large


# -- the chunk window ----------------------------------------------------------------------------


def reference_forwards(chunks: int, window: int, steps: int, shortcut=(8, 16, 16)):
    """MAGI-1's loop, from its published algorithm (generate_sequences + the t_index rule): per
    forward, (committed clean chunk or None, chunks in the window, t of each, oldest first)."""
    t = magi_times(steps, shortcut)
    per_stage = steps // window
    for stage in range(chunks + window - 1):
        clip_start, clip_end = max(0, stage - window + 1), min(chunks, stage + 1)
        t_start, t_end = max(0, stage - chunks + 1), min(window, stage + 1)
        for local in range(per_stage):
            index = [j * per_stage + local for j in range(t_start, t_end)][::-1]
            extra = clip_start - 1 if clip_start > 0 and local == 0 else None
            yield extra, list(range(clip_start, clip_end)), [float(t[i]) for i in index]


def plan_forwards(chunks: int, window: int, steps: int):
    sampling = SamplingConfig(timesteps=None, num_steps=steps, spacing="magi", solver="euler")
    schedule = build_schedule(sampling)
    for tick in pyramid(schedule, offset=steps // window, num_blocks=chunks):
        commits = [w.block for w in tick.work if w.commit]
        working = [w for w in tick.work if not w.commit]
        yield (commits[0] if commits else None), [w.block for w in working], [1.0 - w.sigma_in for w in working]


@pytest.mark.parametrize(
    "chunks, window, steps", [(4, 4, 64), (6, 4, 16), (3, 4, 12), (7, 4, 12), (5, 2, 8), (2, 1, 4)]
)
def test_the_pyramid_plan_is_magis_chunk_window(chunks, window, steps):
    """Every forward of the reference (chunks in the window, their t, the prepended clean chunk)
    is a tick of our plan with offset steps / window, in the same order; our plan only adds the
    last chunk's commit at the end (the reference stops once it is clean)."""
    ours, theirs = list(plan_forwards(chunks, window, steps)), list(reference_forwards(chunks, window, steps))
    assert len(ours) == len(theirs) + 1 and len(theirs) == steps // window * (chunks + window - 1)
    for k, ((c1, b1, t1), (c2, b2, t2)) in enumerate(zip(ours, theirs)):
        assert (c1, b1) == (c2, b2), f"forward {k}: ours {c1, b1}, reference {c2, b2}"
        assert t1 == pytest.approx(t2, abs=1e-12), f"forward {k}: t {t1} vs {t2}"
    assert ours[-1] == (chunks - 1, [], [])


def test_stage_table_of_the_reference_memo():
    """4 chunks, window 4, 64 steps, local step 0: t of each chunk (oldest first) per stage."""
    table = [[round(t, 4) for t in ts] for _, _, ts in list(plan_forwards(4, 4, 64))[:-1][::16]]
    assert table == [[0.0], [0.0217, 0.0], [0.1, 0.0217, 0.0], [0.3, 0.1, 0.0217, 0.0], [0.3, 0.1, 0.0217],
                     [0.3, 0.1], [0.3]]  # fmt: skip


def test_shortcut_grid_and_step_sizes():
    t = magi_times(12)
    assert [round(x, 6) for x in t[[0, 3, 6, 9, 12]]] == [0.0, 0.021739, 0.1, 0.3, 1.0]
    assert t[1] == pytest.approx(0.005263, abs=1e-6) and t[10] == pytest.approx(0.521277, abs=1e-6)
    assert [step_size(12, 4, s) for s in range(3)] == [4, 8, 8]
    assert [step_size(12, 4, s, (16, 16, 8)) for s in range(3)] == [8, 8, 4]
    assert step_size(16, 4, 0) == 8 and step_size(64, 4, 5) == 32


def test_guidance_buckets():
    schedule = build_schedule(TINY.sampling)
    guidance = Guidance(MagiGuidance(), schedule, 4)
    assert guidance._scales(0.0) == (1.5, 7.5)
    assert guidance._scales(0.1) == (1.5, 7.5)
    assert guidance._scales(0.3) == (1.0, 0.0)  # the last stage: plain history + null caption
    assert guidance._scales(0.9999) == (1.0, 0.0)


# -- KV commits -----------------------------------------------------------------------------------


def _distilled(preset, **plan):
    model = dataclasses.replace(preset.model, distill=True)
    sampling = dataclasses.replace(preset.sampling, magi=MagiGuidance(passes=1, nearly_clean_t=0.3))
    return dataclasses.replace(preset, model=model, sampling=sampling, plan=dataclasses.replace(preset.plan, **plan))


def _latents(preset, blocks=6, prompt="a red circle") -> torch.Tensor:
    pipeline = build_session(preset, WeightPaths(seed=2), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return torch.cat([b.latents for b in pipeline.run(prompt, blocks=blocks, seed=0)], dim=2)


@pytest.mark.parametrize("kept, schedule", [(1, "pyramid"), (2, "pyramid"), (3, "pyramid"), (1, "sequential")])
def test_cached_history_equals_recomputed_history(kept, schedule):
    """With the cache keeping `kept` past chunks, its ring wraps and its slots stop being in frame
    order: the per-chunk KV ranges must still admit exactly the chunks they name. The sequential
    plan keeps no chunk in flight, so its cache must hold the widest reach (4 committed chunks)
    whatever the preset's window says."""
    frames = TINY.stream.frames_per_block
    stream = dataclasses.replace(TINY.stream, window_frames=(kept + 1) * frames)
    offset = None if schedule == "sequential" else TINY.plan.offset
    preset = dataclasses.replace(_distilled(TINY, schedule=schedule, offset=offset), stream=stream)
    cached = _latents(preset, blocks=8)
    recomputed = _latents(
        dataclasses.replace(preset, plan=dataclasses.replace(preset.plan, compute="window")), blocks=8
    )
    assert_close(cached, recomputed, 1e-5, f"{schedule}, {kept} kept chunks: cached vs recomputed history")


def test_committed_clean_chunks_equal_recomputing_the_history_every_step():
    """Selective (clean chunks' K/V written once, at clean_t with the null caption) against the
    window mode that re-runs the clean history in every forward, with MAGI-1's KV ranges."""
    cached = _latents(_distilled(TINY))
    recomputed = _latents(_distilled(TINY, compute="window"))
    assert_close(cached, recomputed, 1e-5, "KV commit vs recomputed history")
    unbounded = _latents(_distilled(TINY, history_reach=None))
    assert (unbounded - cached).abs().max() > 1e-3, "the per-stage KV ranges must change what chunks see"


def test_base_guidance_runs_three_passes_and_keeps_the_null_pass_kv():
    pipeline = build_session(TINY, WeightPaths(seed=2), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        blocks = list(pipeline.run("a red circle", blocks=5, seed=0))
    cache = pipeline.executors(NoiseSource(0), blocks_in_forward=1).cache  # as the run's, empty
    assert cache.k.shape[1] == 2 and cache.commit_from == 1
    executor = pipeline.executors(NoiseSource(0), blocks_in_forward=5)
    with torch.no_grad():
        list(executor.run(pipeline.plan(5), pipeline.prompts.conditioning("a red circle")))
    committed = executor.cache.k[:, :, : executor.cache.visible_frames * executor.cache.T]
    assert torch.equal(committed[:, 0], committed[:, 1]), "both conditioned passes read the null pass's clean K/V"
    assert len(blocks) == 5 and all(torch.isfinite(b.latents).all() for b in blocks)


# -- the network ---------------------------------------------------------------------------------


def _tiny_model(cfg: MagiConfig = TINY.model, seed: int = 0) -> MagiModel:
    model = MagiModel(cfg)
    init_magi_random_(model, seed)
    with torch.no_grad():  # move the norms off identity so that a misplaced one shows
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if "norm" in name or name == "rope.bands":
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_rotary_turns_channel_d_with_d_plus_48_and_is_relative():
    bands = torch.tensor([1.0, 0.3, 0.05, 0.01])
    rope = MagiRope(bands, (4, 4))
    x = torch.randn(1, 16, 2, 32)
    rotation = rope.tables(5, 1)
    out = rope.apply(x, rotation)
    angles = torch.angle(rotation)  # [16, 12]
    half = 12
    expected_first = x[..., :half] * angles.cos()[:, None] - x[..., half : 2 * half] * angles.sin()[:, None]
    assert_close(out[..., :half], expected_first, 1e-5, "rotated first half")
    assert torch.equal(out[..., 2 * half :], x[..., 2 * half :]), "channels past 2 * 3 * bands stay put"
    expected_time = torch.polar(torch.ones(4), 5 * bands).expand(16, 4)
    assert_close(
        torch.view_as_real(rotation[:, :4]), torch.view_as_real(expected_time), 1e-6, "time angle = frame * band"
    )
    q, k = torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32)
    score = lambda a, b: (rope.apply(q, rope.tables(a, 1)) * rope.apply(k, rope.tables(b, 1))).sum()  # noqa: E731
    assert score(7, 3).item() == pytest.approx(score(104, 100).item(), rel=1e-4)


def test_output_projection_interleave():
    B, N, H, Dh = 1, 1, 16, 4
    core, cross = torch.randn(B, N, H, Dh), torch.randn(B, N, H, Dh)
    out = interleave_heads(core, cross)[0, 0]
    D = H * Dh // 8
    for h in range(H):
        g, j = divmod(h, H // 8)
        for c in range(Dh):
            assert out[g * 2 * D + j * Dh + c] == core[0, 0, h, c]
            assert out[g * 2 * D + D + j * Dh + c] == cross[0, 0, h, c]


def _forward(model, latents, sigma, text, frames_per_chunk=2):
    grid = (latents.shape[3] // 2, latents.shape[4] // 2)
    rope = MagiRope(model.rope.bands, grid)
    view = LocalView(rope, 0, latents.shape[2], frames_per_chunk, "causal")
    with torch.no_grad():
        return model(latents, sigma, text, view)


def _text(model, states, length):
    return MagiText(model.embed_caption(states, (length,)), (False,), model.null_caption())


def test_each_chunk_reads_only_its_captions_real_tokens():
    torch.manual_seed(0)
    model = _tiny_model()
    latents, states = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 16, 32)
    sigma = torch.tensor([[0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)  # chunk 0 clean, chunk 1 denoising
    base = _forward(model, latents, sigma, _text(model, states, 5))
    padded = states.clone()
    padded[:, 5:] = torch.randn(1, 11, 32)
    assert_close(_forward(model, latents, sigma, _text(model, padded, 5)), base, 1e-6, "padding is never read")
    changed = states.clone()
    changed[:, 2] += 1.0
    other = _forward(model, latents, sigma, _text(model, changed, 5))
    assert_close(other[:, :, :2], base[:, :, :2], 1e-6, "the clean chunk reads the null caption")
    assert (other[:, :, 2:] - base[:, :, 2:]).abs().max() > 1e-4, "the denoising chunk reads the prompt"


def test_grouped_query_attention_matches_repeated_kv_heads():
    """Query head h reads kv head h // (H / G): the model with G kv heads equals one with H kv
    heads whose k and v projections repeat each group's rows."""
    grouped_cfg = dataclasses.replace(TINY.model, num_heads=4, dim=128, kv_heads=2)
    full_cfg = dataclasses.replace(grouped_cfg, kv_heads=4)
    grouped, full = _tiny_model(grouped_cfg), MagiModel(full_cfg).eval()
    state = grouped.state_dict()
    dh = grouped_cfg.head_dim
    for name, value in list(state.items()):
        if name.endswith("linear_qkv.k.weight") or name.endswith("linear_qkv.v.weight"):
            state[name] = value.unflatten(0, (2, dh)).repeat_interleave(2, dim=0).flatten(0, 1)
        if name.endswith("linear_kv_xattn.weight"):
            state[name] = value.unflatten(0, (2, 2 * dh)).repeat_interleave(2, dim=0).flatten(0, 1)
    full.load_state_dict(state)
    latents, states = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 16, 32)
    sigma = torch.full((1, 4), 0.4, dtype=torch.float64)
    a = _forward(grouped, latents, sigma, _text(grouped, states, 9))
    b = _forward(full, latents, sigma, _text(full, states, 9))
    assert_close(a, b, 1e-5, "GQA vs repeated heads")


def test_24b_input_duplication_and_rescale():
    """half_channel_vae + x_rescale: v = out[:C] / 0.1 from the duplicated, 0.1-scaled latent."""
    cfg = dataclasses.replace(TINY.model, half_channel_vae=True, x_rescale_factor=0.1, gated_linear_unit=True)
    model = _tiny_model(cfg)
    assert model.x_embedder.weight.shape[1] == 8 and model.final_linear.linear.weight.shape[0] == 4 * 8
    latents = torch.randn(1, 4, 2, 8, 8)
    x = model.embed(latents)
    expected = torch.nn.functional.conv3d(
        torch.cat([latents, latents], 1) * 0.1, model.x_embedder.weight, stride=(1, 2, 2)
    )
    assert_close(x, expected.flatten(2).transpose(1, 2), 1e-6, "duplicated, rescaled input")
    flow = _forward(
        model, latents, torch.full((1, 2), 0.5, dtype=torch.float64), _text(model, torch.randn(1, 16, 32), 4)
    )
    assert flow.shape == latents.shape and torch.isfinite(flow).all()


# -- caching, CLI, decoder -------------------------------------------------------------------------


def test_flowcache_on_magi():
    plain = _latents(TINY, blocks=4)
    off = _latents(dataclasses.replace(TINY, cache=CacheConfig(policy="flowcache", threshold=0.0)), blocks=4)
    assert torch.equal(off, plain), "threshold 0 never reuses"
    preset = dataclasses.replace(TINY, cache=CacheConfig(policy="flowcache", threshold=0.3))
    pipeline = build_session(preset, WeightPaths(seed=2), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        run = pipeline.run("a red circle", blocks=4, seed=0)
        cached = torch.cat([b.latents for b in run], dim=2)
    stats = run.stats
    assert stats.hit_rate > 0, "a loose threshold skips some chunk-steps"
    assert (cached - plain).abs().mean() < plain.abs().mean()


def test_generate_cli_runs_the_tiny_preset(tmp_path):
    out = tmp_path / "magi.mp4"
    command = [sys.executable, "-m", "engine.generate", "--preset", "magi-1-tiny", "--blocks", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    from engine.serving.video import read_frames

    frames = read_frames(out)
    assert frames.shape[0] == TINY.pixel_frames(3) == 24, "4 frames per latent frame (MAGI-1's VAE)"
    assert frames.std() > 1, "the tiny MAGI-1 VAE decodes something other than a flat frame"


def test_real_presets_ask_for_the_magi_vae():
    with pytest.raises(SetupError, match="needs MAGI-1's VAE: pass --vae DIR"):
        build_decoder(get_preset("magi-1-4.5b"), WeightPaths(), torch.device("cpu"))


def test_caption_stack_pads_to_the_longest():
    a = CaptionKV([torch.ones(1, 3, 1, 2)], [torch.ones(1, 3, 1, 2)], (2,))
    b = CaptionKV([torch.ones(1, 5, 1, 2)], [torch.ones(1, 5, 1, 2)], (5,))
    both = CaptionKV.stack(a, b)
    assert both.keys[0].shape == (2, 5, 1, 2) and both.lengths == (2, 5) and both.keys[0][0, 3:].abs().sum() == 0


# -- special caption tokens ------------------------------------------------------------------------


def test_special_tokens_lead_every_caption_as_the_run_scripts_order_them(tmp_path):
    """The released layout's rows are picked (HQ: other_tokens[1]; duration "7 or more remain":
    other_tokens[14]) and end up in front as [duration, HQ, prompt ...], cut to the caption length."""
    width = TINY.model.text_dim
    rows = np.arange(17 * width, dtype=np.float16).reshape(17, width) / 1000
    path = tmp_path / "special_tokens.npz"
    np.savez(path, other_tokens=rows, caption_token=rows[:1], logo_token=rows[:1])
    tokens = SpecialTokens.load(path)
    states = torch.ones(1, 6, width)
    states[:, 4:] = 0  # 4 real tokens
    out, length = tokens.prepend(states, 4, ("hq", "duration"))
    assert length == 6 and out.shape == states.shape
    assert torch.equal(out[0, 0], torch.from_numpy(rows[14]).float()), "the duration token comes first"
    assert torch.equal(out[0, 1], torch.from_numpy(rows[1]).float()) and torch.equal(out[0, 2:], states[0, :4])
    full, full_length = tokens.prepend(torch.ones(1, 4, width), 4, ("hq", "duration"))
    assert full_length == 4 and torch.equal(full[0, 2:], torch.ones(2, width)), "cut to the caption length"


def test_a_real_magi_preset_asks_for_its_special_tokens(tmp_path):
    preset = get_preset("magi-1-4.5b")
    assert preset.text.special_tokens == ("hq", "duration")
    with pytest.raises(SetupError, match="--special-tokens"):
        build_special_tokens(preset, WeightPaths(checkpoint=tmp_path))
    bad = tmp_path / "bad.npz"
    np.savez(bad, other_tokens=np.zeros((3, 4096), np.float32))
    with pytest.raises(SetupError, match="expected"):
        build_special_tokens(preset, WeightPaths(special_tokens=bad))


def test_special_tokens_change_what_the_tiny_model_makes():
    plain = _latents(dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, special_tokens=())), blocks=3)
    padded = _latents(TINY, blocks=3)
    assert (plain - padded).abs().max() > 1e-4, "the caption tokens must reach cross-attention"
