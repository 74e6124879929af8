"""Selective computation vs recomputing the whole window, on an asynchronous SkyReels-style plan.

For each attention mode and offset (ar_step), the same video is generated twice: `window`
(every block of the window in every forward: finished ones at t = 0, unstarted ones as noise, as
SkyReels-V2's pipelines do) and `selective` (only the blocks with work; finished ones through
their committed K/V). Reported: PSNR/SSIM of the selective video against the window video,
the latents' largest difference, tokens and FLOPs actually computed, and wall-clock time.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from engine.devices import resolve_device
from engine.eval.metrics import psnr, ssim
from engine.families import forward_flops
from engine.models.vae import to_uint8
from engine.runtime.session import Session
from engine.weight_paths import WeightPaths
from launch.benchmarks.common import session_for
from launch.presets import get_preset

COLUMNS = [
    "attention",
    "offset",
    "forwards",
    "tokens_sel/win",
    "flops_sel/win",
    "speedup",
    "psnr_db",
    "ssim",
    "latent_max_diff",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="skyreels-v2-df-tiny", help="model preset")
    parser.add_argument("--blocks", type=int, default=8, help="blocks in the video (one segment)")
    parser.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 3], help="ar_step values")
    parser.add_argument(
        "--attention", nargs="+", default=["bidirectional", "causal"], help="attention among the window's blocks"
    )
    parser.add_argument("--seed", type=int, default=0, help="the video's seed")
    parser.add_argument("--prompt", default="a red circle moving left", help="the video's prompt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def _generate(session: Session, prompt: str, blocks: int, seed: int) -> tuple[np.ndarray, torch.Tensor, float, list]:
    """(frames, latents, seconds spent generating latents, (query, key) frames of each forward)."""
    start = time.perf_counter()
    run = session.run(prompt, blocks=blocks, seed=seed)
    latents = torch.cat([block.latents for block in run], dim=2)
    seconds = time.perf_counter() - start
    session.decoder.reset()
    frames = to_uint8(session.decoder.decode(latents))
    calls = [call for call, count in run.stats.calls.items() for _ in range(count)]
    return frames, latents, seconds, calls


def _session(base, attention: str, offset: int, compute: str, device) -> Session:
    plan = dataclasses.replace(
        base.plan,
        schedule="skyreels",
        offset=offset,
        attention=attention,
        compute=compute,
        segment_frames=None,
        overlap_frames=0,
    )
    preset = dataclasses.replace(base, plan=plan)
    shipped = base.random_init or base.bundled_weights is not None  # else: no weights here, draw random ones
    return session_for(preset, device, WeightPaths(random=not shipped))


def _flops(preset, calls) -> int:
    T, branches = preset.tokens_per_frame, 2 if preset.sampling.guided else 1
    return branches * sum(forward_flops(preset.model, q * T, k * T, preset.text.text_len) for q, k in calls)


def run(args: argparse.Namespace):
    base, device = get_preset(args.preset), resolve_device(args.device)
    rows = []
    for attention in args.attention:
        for offset in args.offsets:
            runs = {}
            for compute in ("window", "selective"):
                session = _session(base, attention, offset, compute, device)
                runs[compute] = _generate(session, args.prompt, args.blocks, args.seed)
            (win_frames, win_lat, win_s, win_calls), (sel_frames, sel_lat, sel_s, sel_calls) = (
                runs["window"],
                runs["selective"],
            )
            rows.append(
                {
                    "attention": attention,
                    "offset": offset,
                    "forwards": len(sel_calls),
                    "tokens_sel/win": sum(q for q, _ in sel_calls) / sum(q for q, _ in win_calls),
                    "flops_sel/win": _flops(base, sel_calls) / _flops(base, win_calls),
                    "speedup": win_s / sel_s,
                    "psnr_db": psnr(sel_frames, win_frames),
                    "ssim": ssim(sel_frames, win_frames),
                    "latent_max_diff": (sel_lat - win_lat).abs().max().item(),
                    "window_seconds": win_s,
                    "selective_seconds": sel_s,
                    "window_flops": _flops(base, win_calls),
                    "selective_flops": _flops(base, sel_calls),
                }
            )
    settings = {
        "preset": args.preset,
        "blocks": args.blocks,
        "seed": args.seed,
        "prompt": args.prompt,
        "steps": base.sampling.steps,
        "frames_per_block": base.stream.frames_per_block,
    }
    return rows, COLUMNS, settings
