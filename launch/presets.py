"""Named presets: functions returning frozen, validated `Preset`s.

python -m launch.presets            # list them
python -m launch.presets --counts   # parameter counts and KV memory, built on the meta device
python -m launch.presets --fit wan-14b-causal --gpu-memory 32GiB   # will it fit? (launch/fit.py)
python -m launch.presets --fit all  # every preset at 12, 16, 24, 32, 48 and 80 GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import torch

from engine.argparsing import OneLineParser
from engine.config import (
    ConfigError,
    MagiConfig,
    MagiGuidance,
    MagiVaeConfig,
    PlanConfig,
    Preset,
    SamplingConfig,
    StreamConfig,
    TextConfig,
    TinyTextEncoder,
    VaeConfig,
    WanConfig,
)
from engine.demo.scenes import COLORS, SHAPES
from engine.footprint import parse_bytes

WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
TINY_WAN = WanConfig(
    dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=32, freq_dim=32
)
TINY_VAE = VaeConfig(
    base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4
)
TINY_TEXT = TextConfig(text_len=16, tiny=TinyTextEncoder(d_model=32))

# SkyReels-V2 DF: 540P, 97-frame (25 latent) segments, async ar_step 5 with 5-frame blocks,
# overlap_history 17 frames (5 latents), addnoise_condition 20, 30 UniPC steps at shift 8, CFG 6.
SKYREELS_SAMPLING = SamplingConfig(timesteps=None, num_steps=30, shift=8.0, solver="unipc-skyreels", guidance_scale=6.0)
SKYREELS_STREAM = StreamConfig(height=544, width=960, frames_per_block=5, window_frames=25, fps=24)
SKYREELS_PLAN = PlanConfig(
    schedule="skyreels",
    offset=5,
    attention="bidirectional",
    compute="window",
    segment_frames=25,
    overlap_frames=5,
    addnoise_condition=20.0,
)


# Wan2.2-TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers configs): the Wan2.1 layout at dim 3072 with 48
# latent channels, and the Wan2.2 VAE (16x spatial, 4x temporal; 2 x 2 pixels folded into 12
# channels). Latent statistics: the VAE config's latents_mean / latents_std.
WAN22_5B = WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
WAN22_VAE = VaeConfig(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, pixel_patch=2,
    latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
)  # fmt: skip
TINY_WAN22_VAE = dataclasses.replace(
    WAN22_VAE, base_dim=8, decoder_base_dim=12, dim_mult=(1, 2, 2, 2), num_res_blocks=1
)


DEMO_VOCAB = ("a", "an", *COLORS, *SHAPES, "moving", "bouncing", "up", "down", "left", "right")


def demo() -> Preset:
    """The model arcade trains and ships: moving shapes at 64x64; latents are 16 principal components
    of 4x4 pixel patches (one latent frame per video frame)."""
    return Preset(
        name="demo",
        description="trained demo: shapes moving on dark backgrounds, 64x64, 3-frame blocks, 4 steps",
        model=WanConfig(
            dim=128, ffn_dim=512, num_heads=4, num_layers=6, in_channels=16, out_channels=16, text_dim=64, freq_dim=64
        ),
        vae=VaeConfig(kind="patches", patch=4, z_dim=16),
        text=TextConfig(text_len=8, vocab=DEMO_VOCAB),
        stream=StreamConfig(height=64, width=64, frames_per_block=3, window_frames=9, sink_frames=0, fps=16),
        sampling=SamplingConfig(),  # Self-Forcing's 4 steps, warped by shift 5: 1000, 937.5, 833.3, 625
        bundled_weights="demo",
    )


def tiny_wan() -> Preset:
    """A 2-layer Wan with seeded random weights, 64x64 video: for tests and smoke runs."""
    return Preset(
        name="tiny-wan",
        description="2-layer random Wan, 64x64, 3-frame blocks, window 9 incl. 3 sink frames",
        model=TINY_WAN,
        vae=TINY_VAE,
        text=TINY_TEXT,
        stream=StreamConfig(height=64, width=64, frames_per_block=3, window_frames=9, sink_frames=3),
        random_init=True,
    )


def mid_wan() -> Preset:
    """A mid-size random Wan (15M parameters, 128x128): for CPU measurements where a 2-layer model
    is all overhead and a 1.3B one does not fit the time."""
    return Preset(
        name="mid-wan",
        description="6-layer random Wan (dim 384, 6 heads), 128x128, 3-frame blocks, window 9",
        model=WanConfig(dim=384, ffn_dim=1536, num_heads=6, num_layers=6, in_channels=4, out_channels=4, text_dim=32),
        vae=TINY_VAE,
        text=TINY_TEXT,
        stream=StreamConfig(height=128, width=128, frames_per_block=3, window_frames=9),
        random_init=True,
    )


def skyreels_v2_df_tiny() -> Preset:
    """SkyReels-V2 DF's recipe on a 2-layer random Wan with the fps embedding: for tests."""
    return Preset(
        name="skyreels-v2-df-tiny",
        description="2-layer random SkyReels-V2 DF, 64x64, 2-frame blocks, 8-frame segments, 6 UniPC steps",
        model=dataclasses.replace(TINY_WAN, fps_embedding=True),
        vae=TINY_VAE,
        text=TINY_TEXT,
        stream=StreamConfig(height=64, width=64, frames_per_block=2, window_frames=8, fps=24),
        sampling=dataclasses.replace(SKYREELS_SAMPLING, num_steps=6, guidance_scale=3.0),
        plan=dataclasses.replace(SKYREELS_PLAN, offset=2, segment_frames=8, overlap_frames=2),
        random_init=True,
    )


def skyreels_v2_df_1_3b() -> Preset:
    """SkyReels-V2-DF-1.3B-540P (with its fps embedding)."""
    return Preset(
        name="skyreels-v2-df-1.3b",
        description="SkyReels-V2 DF 1.3B, 544x960, async ar_step 5, 25-frame segments, UniPC 30 steps, CFG 6",
        model=dataclasses.replace(WAN_1_3B, fps_embedding=True),
        stream=SKYREELS_STREAM,
        sampling=SKYREELS_SAMPLING,
        plan=SKYREELS_PLAN,
    )


def skyreels_v2_df_14b() -> Preset:
    """SkyReels-V2-DF-14B-540P."""
    return Preset(
        name="skyreels-v2-df-14b",
        description="SkyReels-V2 DF 14B, 544x960, async ar_step 5, 25-frame segments, UniPC 30 steps, CFG 6",
        model=WAN_14B,
        stream=SKYREELS_STREAM,
        sampling=SKYREELS_SAMPLING,
        plan=SKYREELS_PLAN,
    )


def self_forcing_1_3b() -> Preset:
    """Self-Forcing (chunk-wise) on Wan2.1-T2V-1.3B: 4 warped steps, 21-frame window."""
    return Preset(
        name="self-forcing-1.3b",
        description="Self-Forcing DMD on Wan2.1-T2V-1.3B, 480x832, 3-frame blocks, window 21",
        model=WAN_1_3B,
        stream=StreamConfig(window_frames=21),
    )


def longlive_1_3b() -> Preset:
    """LongLive: short window of 12 frames, the first 3 kept as a sink."""
    return Preset(
        name="longlive-1.3b",
        description="LongLive on Wan2.1-T2V-1.3B, window 12 incl. 3 sink frames",
        model=WAN_1_3B,
        stream=StreamConfig(window_frames=12, sink_frames=3),
    )


def causvid_1_3b() -> Preset:
    """CausVid: 3 steps [1000, 757, 522] at shift 8, not warped."""
    return Preset(
        name="causvid-1.3b",
        description="CausVid DMD on Wan2.1-T2V-1.3B, 3 steps, shift 8",
        model=WAN_1_3B,
        sampling=SamplingConfig(timesteps=(1000.0, 757.0, 522.0), shift=8.0, warp=False),
    )


def wan_14b_causal() -> Preset:
    """A Self-Forcing-style causal Wan2.1-T2V-14B (Krea Realtime's architecture)."""
    return Preset(
        name="wan-14b-causal",
        description="causal Wan2.1-T2V-14B, 480x832, 3-frame blocks, window 21",
        model=WAN_14B,
        stream=StreamConfig(window_frames=21),
    )


def wan22_ti2v_5b() -> Preset:
    """Wan2.2-TI2V-5B as released: one bidirectional 121-frame clip (31 latent frames) at 1280x704,
    24 fps, UniPC 50 steps at shift 5, CFG 5 (its generate.py defaults): SkyReels-V2's segment plan
    with every frame at the same step (offset 0) runs exactly that."""
    return Preset(
        name="wan2.2-ti2v-5b",
        description="Wan2.2-TI2V-5B base, 704x1280, one 31-latent-frame clip, UniPC 50 steps, CFG 5",
        model=WAN22_5B,
        vae=WAN22_VAE,
        stream=StreamConfig(height=704, width=1280, frames_per_block=31, window_frames=31, fps=24),
        sampling=SamplingConfig(timesteps=None, num_steps=50, shift=5.0, solver="unipc", guidance_scale=5.0),
        plan=PlanConfig(schedule="skyreels", offset=0, attention="bidirectional", compute="window", segment_frames=31),
    )


def longlive2_5b() -> Preset:
    """LongLive-2.0 on Wan2.2-TI2V-5B (NVlabs/LongLive configs/inference.yaml): 8-frame blocks, a
    32-frame window whose first 8 frames are the sink (kept at their positions), UniPC 4 steps at
    shift 5 per block, no CFG; 880 tokens per latent frame at 1280x704."""
    return Preset(
        name="longlive2-5b",
        description="LongLive-2.0 on Wan2.2-TI2V-5B, 704x1280, 8-frame blocks, window 32 incl. 8 sink, 4 UniPC steps",
        model=WAN22_5B,
        vae=WAN22_VAE,
        stream=StreamConfig(height=704, width=1280, frames_per_block=8, window_frames=32, sink_frames=8, fps=24),
        sampling=SamplingConfig(timesteps=None, num_steps=4, shift=5.0, solver="unipc"),
    )


def tiny_wan22() -> Preset:
    """LongLive-2.0's recipe on a 2-layer random Wan with 48 latent channels and a narrow Wan2.2
    VAE (residual levels, 2 x 2 pixel folding, 16x spatial stride): for tests."""
    return Preset(
        name="tiny-wan22",
        description="2-layer random Wan2.2-style model (48 channels, 16x VAE), 64x96, 2-frame blocks, 4 UniPC steps",
        model=dataclasses.replace(TINY_WAN, in_channels=48, out_channels=48),
        vae=TINY_WAN22_VAE,
        text=TINY_TEXT,
        stream=StreamConfig(height=64, width=96, frames_per_block=2, window_frames=8, sink_frames=2, fps=24),
        sampling=SamplingConfig(timesteps=None, num_steps=4, shift=5.0, solver="unipc"),
        random_init=True,
    )


# MAGI-1 (reference §2.1): 6-frame chunks, a window of 4 chunks offset by steps / 4, per-stage KV
# ranges 5, 4, 3, 2 chunks (1 for the clean chunk), Euler on the t^2 + shift-3 grid.
MAGI_4_5B = MagiConfig(dim=3072, ffn_dim=12288, num_heads=24, num_layers=34)
MAGI_24B = MagiConfig(
    dim=6144, ffn_dim=16384, num_heads=48, num_layers=48, gated_linear_unit=True, half_channel_vae=True,
    x_rescale_factor=0.1,
)  # fmt: skip
MAGI_BASE = MagiGuidance(passes=3)
MAGI_DISTILL = MagiGuidance(passes=1, nearly_clean_t=0.3)
MAGI_REACH = (5, 4, 3, 2)
MAGI_SPECIAL = ("hq", "duration")
# A one-layer MAGI-1 VAE (same 4 x 8 x 8 patches) with 32-pixel tiles, so 64x64 frames still tile
# and blend as 720p frames do, and 8-frame temporal tiles: one 2-latent-frame chunk each.
TINY_MAGI_VAE = VaeConfig(
    kind="magi", z_dim=4,
    magi=MagiVaeConfig(dim=256, num_layers=1, num_heads=4, z_dim=4, trained_size=32, trained_frames=8, tile_px=32,
                       tile_frames=8),
)  # fmt: skip  # PAD_HQ=1 PAD_DURATION=1, as MAGI-1's run scripts set them


def _magi(name: str, model: MagiConfig, steps: int, guidance: MagiGuidance, size: tuple[int, int], what: str) -> Preset:
    return Preset(
        name=name,
        description=what,
        model=dataclasses.replace(model, distill=guidance.passes == 1),
        vae=VaeConfig(kind="magi"),
        text=TextConfig(text_len=800, special_tokens=MAGI_SPECIAL),  # T5-XXL states, 800 tokens per caption
        stream=StreamConfig(height=size[0], width=size[1], frames_per_block=6, window_frames=12, fps=24),
        sampling=SamplingConfig(timesteps=None, num_steps=steps, spacing="magi", solver="euler", magi=guidance),
        plan=PlanConfig(schedule="pyramid", offset=steps // 4, history_reach=MAGI_REACH),
    )


def magi_1_4_5b() -> Preset:
    return _magi("magi-1-4.5b", MAGI_4_5B, 64, MAGI_BASE, (720, 720), "MAGI-1 4.5B base, 720x720, 64 steps, 3-pass CFG")


def magi_1_4_5b_distill() -> Preset:
    return _magi(
        "magi-1-4.5b-distill",
        MAGI_4_5B,
        64,
        MAGI_DISTILL,
        (720, 720),
        "MAGI-1 4.5B distilled, 720x720, 64 steps, 1 pass",
    )


def magi_1_24b() -> Preset:
    return _magi("magi-1-24b", MAGI_24B, 32, MAGI_BASE, (720, 1280), "MAGI-1 24B base, 720x1280, 32 steps, 3-pass CFG")


def magi_1_24b_distill() -> Preset:
    return _magi(
        "magi-1-24b-distill",
        MAGI_24B,
        16,
        MAGI_DISTILL,
        (720, 1280),
        "MAGI-1 24B distilled, 720x1280, 16 steps, 1 pass",
    )


def magi_1_tiny() -> Preset:
    """MAGI-1's recipe on a 2-layer random network: for tests and smoke runs."""
    return Preset(
        name="magi-1-tiny",
        description="2-layer random MAGI-1, 64x64, 2-frame chunks, 8 steps, window 4, 3-pass CFG",
        model=MagiConfig(
            dim=64,
            ffn_dim=128,
            num_heads=2,
            kv_heads=1,
            num_layers=2,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            caption_len=56,
            freq_dim=32,
            rope_bands=4,
        ),  # fmt: skip
        vae=TINY_MAGI_VAE,
        text=dataclasses.replace(TINY_TEXT, special_tokens=MAGI_SPECIAL),
        stream=StreamConfig(height=64, width=64, frames_per_block=2, window_frames=4, fps=24),
        sampling=SamplingConfig(timesteps=None, num_steps=8, spacing="magi", solver="euler", magi=MAGI_BASE),
        plan=PlanConfig(schedule="pyramid", offset=2, history_reach=MAGI_REACH),
        random_init=True,
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "demo": demo,
    "tiny-wan": tiny_wan,
    "mid-wan": mid_wan,
    "self-forcing-1.3b": self_forcing_1_3b,
    "longlive-1.3b": longlive_1_3b,
    "causvid-1.3b": causvid_1_3b,
    "wan-14b-causal": wan_14b_causal,
    "skyreels-v2-df-tiny": skyreels_v2_df_tiny,
    "skyreels-v2-df-1.3b": skyreels_v2_df_1_3b,
    "skyreels-v2-df-14b": skyreels_v2_df_14b,
    "magi-1-4.5b": magi_1_4_5b,
    "magi-1-4.5b-distill": magi_1_4_5b_distill,
    "magi-1-24b": magi_1_24b,
    "magi-1-24b-distill": magi_1_24b_distill,
    "magi-1-tiny": magi_1_tiny,
    "wan2.2-ti2v-5b": wan22_ti2v_5b,
    "longlive2-5b": longlive2_5b,
    "tiny-wan22": tiny_wan22,
}


class UnknownPreset(ConfigError, KeyError):
    """A preset name that is not in PRESETS: a user error (ConfigError), and still the KeyError a
    failed lookup is, for callers that catch that."""

    __str__ = ConfigError.__str__  # KeyError's would print the sentence in quotes


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownPreset(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return PRESETS[name]()


def parameter_count(preset: Preset) -> int:
    """Transformer parameters, counted on the meta device (no memory)."""
    from engine.loading import new_model

    with torch.device("meta"):
        model = new_model(preset.model)
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(preset: Preset, dtype: torch.dtype = torch.bfloat16) -> int:
    """Self-attention KV cache of one stream, measured on a meta-device allocation."""
    from engine.loading import build_kv_cache

    return build_kv_cache(preset, dtype, "meta").nbytes


def _print_counts(names: list[str]) -> None:
    print(f"{'preset':<20} {'params':>14} {'tokens/frame':>13} {'KV (bf16)':>10}")
    for name in names:
        preset = get_preset(name)
        params = parameter_count(preset)
        kv = kv_cache_bytes(preset) / 2**30
        print(f"{name:<20} {params:>14,} {preset.tokens_per_frame:>13} {kv:>8.2f} G")


def _memory_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m launch.presets", description="List presets and their sizes.")
    parser.add_argument("--counts", action="store_true", help="print parameter counts (meta device) and KV memory")
    parser.add_argument("--fit", metavar="PRESET", help="the memory plan of PRESET (or all) on a GPU: where every "
                        "part goes and the cheapest options that fit (default: off)")  # fmt: skip
    parser.add_argument("--gpu-memory", type=_memory_size, help="with --fit: the GPU's memory, e.g. 24GiB "
                        "(default: a table at 12, 16, 24, 32, 48 and 80 GiB)")  # fmt: skip
    parser.add_argument("names", nargs="*", help="presets to show (default: all)")
    args = parser.parse_args(argv)
    if args.gpu_memory is not None and args.fit is None:
        parser.error("--gpu-memory goes with --fit PRESET")
    names = [args.fit] if args.fit not in (None, "all") else args.names or list(PRESETS)
    try:
        for name in names:
            get_preset(name)  # fail early on a typo
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.fit is not None:
        from launch.fit import print_fit

        print_fit([get_preset(name) for name in names], args.gpu_memory)
    elif args.counts:
        _print_counts(names)
    else:
        for name in names:
            print(f"{name:<20} {get_preset(name).description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
