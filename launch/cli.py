"""Command-line flags shared by generate, stream and bench: preset, weights, plan, sampling.

Flags override fields of the preset's frozen configs through `dataclasses.replace`, so every
override passes the same validation as the presets themselves (a `ConfigError` says what is
wrong).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from engine.config import (
    ATTENTION,
    CACHE_POLICIES,
    COMPUTE,
    CONTEXTS,
    SCHEDULES,
    SOLVERS,
    SWITCHES,
    ConfigError,
    Preset,
)
from engine.loading import SetupError, WeightPaths, resolve_device
from engine.models.checkpoints.wan import CheckpointError
from launch.presets import PRESETS, get_preset
from parallel.topology import ParallelConfig, Topology, TopologyError

DEFAULT_PRESET = "demo"
"""What the entry points run when no --preset is given: the shipped demo model."""
USER_ERRORS = (SetupError, CheckpointError, ConfigError, TopologyError, OSError)
"""Errors the entry points report as a one-line message (exit code 2), not a traceback."""

# flag -> (config section, field)
_PLAN_FLAGS = {
    "schedule": "schedule",
    "offset": "offset",
    "window_attention": "attention",
    "compute": "compute",
    "segment_frames": "segment_frames",
    "overlap_frames": "overlap_frames",
    "addnoise_condition": "addnoise_condition",
}
_SAMPLING_FLAGS = {
    "steps": "num_steps",
    "shift": "shift",
    "solver": "solver",
    "guidance_scale": "guidance_scale",
    "negative_prompt": "negative_prompt",
}


def add_preset_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_PRESET) -> None:
    parser.add_argument("--preset", default=default, choices=sorted(PRESETS), help=f"model preset (default {default})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weights")
    group.add_argument(
        "--checkpoint", type=Path, help="transformer weights: diffusers folder, Wan .safetensors/.pth, Self-Forcing .pt"
    )
    group.add_argument("--base", type=Path, help="Wan2.1 diffusers folder with text_encoder/, tokenizer/, vae/")
    group.add_argument("--text-encoder", type=Path, help="umT5 transformers folder (overrides --base)")
    group.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the text encoder)")
    group.add_argument("--vae", type=Path, help="VAE: diffusers folder or Wan2.1_VAE.pth (overrides --base)")
    group.add_argument("--lora", type=Path, help="LoRA adapter merged into the transformer (LongLive's lora.pt)")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    group.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Self-Forcing .pt: use generator_ema (default when present) or generator",
    )
    group.add_argument("--random-weights", action="store_true", help="seeded random weights for every part")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan and sampling (default: the preset's)")
    group.add_argument("--schedule", choices=SCHEDULES, help="sequential, pyramid, cascade (over ranks) or skyreels")
    group.add_argument("--offset", type=int, help="ticks between block starts (SkyReels ar_step; 0 = synchronous)")
    group.add_argument("--context", choices=CONTEXTS, help="in-flight blocks see current (joint) or last tick's K/V")
    group.add_argument("--switch", choices=SWITCHES, help="prompt switch: next-step, or recache (LongLive)")
    group.add_argument("--window-attention", choices=ATTENTION, help="attention among the blocks of one forward")
    group.add_argument(
        "--compute", choices=COMPUTE, help="selective (blocks with work, KV cache) or window (rerun all)"
    )
    group.add_argument("--segment-frames", type=int, help="skyreels: latent frames per segment (base_num_frames)")
    group.add_argument("--overlap-frames", type=int, help="skyreels: latent frames carried into the next segment")
    group.add_argument("--addnoise-condition", type=float, help="skyreels: noise put back on the clean prefix (0-1000)")
    group.add_argument("--steps", type=int, help="number of evenly spaced flow steps (replaces explicit timesteps)")
    group.add_argument("--shift", type=float, help="flow shift")
    group.add_argument("--solver", choices=SOLVERS, help="self-forcing, euler or unipc")
    group.add_argument("--guidance-scale", type=float, help="classifier-free guidance (1 = off)")
    group.add_argument("--negative-prompt", help="prompt of the unconditional branch")
    group = parser.add_argument_group("feature caching (cache/)")
    group.add_argument("--cache", choices=CACHE_POLICIES, help="per-block cache policy (default none)")
    group.add_argument("--cache-threshold", type=float, help="reuse threshold (0 = never reuse)")
    group.add_argument("--cache-warmup", type=int, help="steps each block always computes first")


def _chosen(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag, None) is not None}


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The preset named by --preset with the plan/sampling flags applied (validated)."""
    preset = get_preset(args.preset)
    plan = _chosen(args, _PLAN_FLAGS)
    sampling = _chosen(args, _SAMPLING_FLAGS)
    if "num_steps" in sampling:
        sampling["timesteps"] = None
    cache = _chosen(args, {"cache": "policy", "cache_threshold": "threshold", "cache_warmup": "warmup"})
    return dataclasses.replace(
        preset,
        plan=dataclasses.replace(preset.plan, **plan),
        sampling=dataclasses.replace(preset.sampling, **sampling),
        cache=dataclasses.replace(preset.cache, **cache),
    )


def weights_from_args(args: argparse.Namespace) -> WeightPaths:
    return WeightPaths(
        checkpoint=args.checkpoint,
        base=args.base,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
        vae=args.vae,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        ema=args.ema,
        random=args.random_weights,
    )


def rank_device(args: argparse.Namespace, topology: Topology) -> torch.device:
    """The device a rank runs on: its own under torchrun, else --device."""
    return topology.device if topology.distributed else resolve_device(args.device)


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ranks (under torchrun)")
    group.add_argument("--decode-rank", action="store_true", help="the last rank only decodes and writes")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer ends the job")


def parallel_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(decode_rank=args.decode_rank, timeout_s=args.timeout)
