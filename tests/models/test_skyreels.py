"""SkyReels-V2 diffusion forcing, conformant with diffusers' transformer and pipeline.

pytest tests/models/test_skyreels.py
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
)
from PIL import Image
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from engine.config import ConfigError, PlanConfig
from engine.models.attention import LocalView
from engine.models.checkpoints.wan import CheckpointError, load_weights
from engine.models.rope import Rope
from engine.models.text_encoder import TextEncoder
from engine.models.vae import StreamingDecoder
from engine.models.wan import WanModel
from engine.plan.skyreels import plan_segments
from engine.weight_paths import WeightPaths
from helpers import assert_close, twin_dimensions, write_wan_shards
from launch.build import build_session
from launch.presets import get_preset

TINY_SKYREELS = get_preset("skyreels-v2-df-tiny")
STEPS, GUIDANCE, TEXT_LEN, PROMPT = 4, 3.0, 16, "a red circle moving left"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' SkyReels-V2 DF pipeline on tiny random components, and its transformer saved."""
    torch.manual_seed(0)
    cfg = TINY_SKYREELS.model
    transformer = SkyReelsV2Transformer3DModel(**twin_dimensions(cfg), inject_sample_info=True).eval()
    with torch.no_grad():  # perturb norms so that a mis-mapped norm cannot hide
        for name, param in transformer.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    tokenizer = ByT5Tokenizer()
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    ).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tokenizer, text_encoder=encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("skyreels") / "transformer"
    transformer.save_pretrained(str(folder))
    return pipe, folder


def _ours(folder) -> WanModel:
    with torch.device("meta"):
        model = WanModel(TINY_SKYREELS.model)
    load_weights(model, folder)
    return model.eval()


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_transformer_matches_diffusers(reference, frames_per_block):
    """Per-frame timesteps and the fps embedding, without (1) and with (2) the block-causal mask."""
    pipe, folder = reference
    model, transformer = _ours(folder), pipe.transformer
    generator = torch.Generator().manual_seed(frames_per_block)
    x = torch.randn(1, 4, 4, 8, 8, generator=generator)
    context = torch.randn(1, TEXT_LEN, 32, generator=generator)
    t = torch.tensor([[999, 995, 500, 0]])
    transformer.register_to_config(num_frame_per_block=frames_per_block)
    try:
        for fps, index in ((24, 1), (16, 0)):
            with torch.no_grad():
                expected = transformer(x, t, context, enable_diffusion_forcing=True, fps=[index]).sample
                mode = "causal" if frames_per_block > 1 else "bidirectional"
                view = LocalView(Rope(model.cfg, (4, 4)), 0, 4, frames_per_block if frames_per_block > 1 else 4, mode)
                actual = model(x, t.double() / 1000, model.embed_text(context), view, fps=fps)
            assert_close(actual, expected, 1e-5, f"block size {frames_per_block}, fps {fps}")
    finally:
        transformer.register_to_config(num_frame_per_block=1)


def test_fps_conditioned_model_needs_fps(reference):
    model = _ours(reference[1])
    view = LocalView(Rope(model.cfg, (4, 4)), 0, 1, 1, "bidirectional")
    with pytest.raises(ValueError, match="pass fps"):
        model(torch.zeros(1, 4, 1, 8, 8), torch.zeros(1, 1), model.embed_text(torch.zeros(1, 4, 32)), view)


def test_released_layouts_load(reference, tmp_path):
    """The diffusers folder, and Wan-native shards with or without an index (SkyReels' own loader
    reads every shard in the folder), hold the same weights."""
    expected = _ours(reference[1])
    native = write_wan_shards(expected, tmp_path / "SkyReels-V2-DF-tiny", shards=3)
    assert torch.equal(_ours(native).fps_projection[2].weight, expected.fps_projection[2].weight)
    (native / "diffusion_pytorch_model.safetensors.index.json").unlink()
    assert torch.equal(_ours(native).fps_embedding.weight, expected.fps_embedding.weight)
    next(native.glob("*-00002-of-*")).unlink()
    with pytest.raises(CheckpointError, match=r"numbers \[2\] of 3"):
        _ours(native)


def _run_diffusers(pipe, latent_frames, ar_step, block, segment=None, overlap=None, video=None):
    """Latents from diffusers' pipeline (its video-to-video pipeline when given `video`). Its
    `latents=` argument is broken in diffusers 0.42 (prepare_latents returns one tensor where four
    values are unpacked), so the noise comes from a seeded generator that we replay on our side."""
    kwargs = {}
    if segment is not None:
        kwargs = dict(base_num_frames=(segment - 1) * 4 + 1, overlap_history=(overlap - 1) * 4 + 1)
    if video is not None:
        pipe = SkyReelsV2DiffusionForcingVideoToVideoPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
        kwargs["video"] = [Image.fromarray(frame) for frame in video]
    pipe.transformer.register_to_config(num_frame_per_block=1)
    return pipe(
        prompt=PROMPT,
        negative_prompt="",
        height=64,
        width=64,
        num_frames=(latent_frames - 1) * 4 + 1,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        max_sequence_length=TEXT_LEN,
        ar_step=ar_step,
        causal_block_size=block,
        fps=24,
        output_type="latent",
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    ).frames


def _replayed_noise(latent_frames, frames_per_block, segment=None, overlap=None, given=0) -> dict:
    """Block -> starting noise, drawn in the order diffusers draws it (one tensor per segment)."""
    generator = torch.Generator().manual_seed(1)
    segments = plan_segments(latent_frames, segment, overlap or 0, frames_per_block, given)
    noise = {}
    for seg in segments:
        draw = torch.randn(1, 4, seg.frames, 8, 8, generator=generator)
        for j in range(seg.prefix_frames // frames_per_block, seg.frames // frames_per_block):
            noise[seg.first_frame // frames_per_block + j] = draw[
                :, :, j * frames_per_block : (j + 1) * frames_per_block
            ]
    return noise


def _session(pipe, folder, ar_step, block, compute, segment=None, overlap=None):
    frames_per_block = block or 1
    preset = dataclasses.replace(
        TINY_SKYREELS,
        stream=dataclasses.replace(TINY_SKYREELS.stream, frames_per_block=frames_per_block),
        sampling=dataclasses.replace(TINY_SKYREELS.sampling, num_steps=STEPS, guidance_scale=GUIDANCE),
        plan=PlanConfig(
            schedule="skyreels",
            offset=ar_step,
            attention="causal" if block else "bidirectional",
            compute=compute,
            segment_frames=segment,
            overlap_frames=overlap or 0,
        ),
    )
    session = build_session(preset, WeightPaths(checkpoint=folder), torch.device("cpu"), torch.float32)
    session.prompts.encoder = TextEncoder(pipe.tokenizer, pipe.text_encoder, TEXT_LEN, "cpu")
    session.decoder = StreamingDecoder(pipe.vae, TINY_SKYREELS.vae)
    return session


def _run_ours(pipe, folder, latent_frames, ar_step, block, compute, segment=None, overlap=None):
    frames_per_block = block or 1
    pipeline = _session(pipe, folder, ar_step, block, compute, segment, overlap)
    noise = _replayed_noise(latent_frames, frames_per_block, segment, overlap)
    blocks = pipeline.run(PROMPT, blocks=latent_frames // frames_per_block, seed=0, initial=noise.__getitem__)
    return torch.cat([b.latents for b in blocks], dim=2)


END_TO_END = [
    # (latent frames, ar_step, causal_block_size, compute, segment, overlap)
    (6, 0, None, "window", None, None),  # synchronous: every frame at every step, bidirectional
    (6, 2, 2, "window", None, None),  # asynchronous (diffusers turns on its block-causal mask)
    (8, 1, 2, "selective", None, None),  # ... computed selectively through the KV cache
    (14, 2, 2, "window", 8, 2),  # long video: three segments, 2-frame overlap in latent space
    (14, 2, 2, "selective", 8, 2),
]


@pytest.mark.parametrize("case", END_TO_END, ids=lambda c: "-".join(str(v) for v in c))
def test_generation_matches_diffusers_pipeline(reference, case):
    frames, ar_step, block, compute, segment, overlap = case
    pipe, folder = reference
    expected = _run_diffusers(pipe, frames, ar_step, block, segment, overlap)
    actual = _run_ours(pipe, folder, frames, ar_step, block, compute, segment, overlap)
    assert_close(actual, expected, 1e-5, f"latents, {case}")


VIDEO_TO_VIDEO = [
    # (new latent frames, ar_step, causal_block_size, compute, segment, overlap): the given clip's
    # last (overlap - 1) * 4 + 1 frames encoded to `overlap` latents, the first segment's prefix
    (6, 2, 2, "window", 8, 2),  # one segment: prefix + 6 new frames
    (10, 1, 2, "selective", 8, 2),  # two segments, through the KV cache
]


@pytest.mark.parametrize("case", VIDEO_TO_VIDEO, ids=lambda c: "-".join(str(v) for v in c))
def test_video_continuation_matches_diffusers_video_to_video(reference, case):
    """A given clip's end, encoded by the Wan VAE and kept clean, as diffusers'
    SkyReelsV2DiffusionForcingVideoToVideoPipeline does; its latents include the prefix, ours
    are the new frames only."""
    new, ar_step, block, compute, segment, overlap = case
    pipe, folder = reference
    clip = np.random.default_rng(2).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    expected = _run_diffusers(pipe, overlap + new, ar_step, block, segment, overlap, video=clip)
    session = _session(pipe, folder, ar_step, block, compute, segment, overlap)
    start = session.encode_start(clip)
    assert start.shape[2] == overlap
    assert_close(start, expected[:, :, :overlap], 1e-5, "the encoded prefix")
    noise = _replayed_noise(overlap + new, block, segment, overlap, given=overlap)
    blocks = session.run(PROMPT, blocks=new // block, seed=0, initial=noise.__getitem__, start=start)
    actual = torch.cat([b.latents for b in blocks], dim=2)
    assert_close(actual, expected[:, :, overlap:], 1e-5, f"continuation latents, {case}")


def test_segments_follow_diffusers_arithmetic():
    """n_iter = 1 + (N - base - 1) // (base - overlap) + 1, each later segment min(left + overlap, base)."""
    for total, base, overlap in ((65, 25, 5), (185, 25, 5), (30, 10, 2), (11, 10, 5)):
        segments = plan_segments(total, base, overlap, 1)
        assert len(segments) == 1 + (total - base - 1) // (base - overlap) + 1
        covered = segments[0].frames + sum(s.frames - s.prefix_frames for s in segments[1:])
        assert covered == total and all(s.frames <= base for s in segments)
        assert all(
            s.first_frame + s.prefix_frames == prev.first_frame + prev.frames for prev, s in zip(segments, segments[1:])
        )
    assert len(plan_segments(20, 25, 5, 5)) == 1


def test_misaligned_sizes_are_refused_not_truncated():
    with pytest.raises(ConfigError, match="whole number"):
        plan_segments(24, 10, 3, 2)
    with pytest.raises(ConfigError, match="overlap"):
        plan_segments(30, 10, 0, 2)
