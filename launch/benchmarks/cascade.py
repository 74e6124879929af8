"""Fidelity of Block Cascading on the demo model: each cascade plan against sequential generation.

For offsets 1..3, joint vs lagged context and causal vs bidirectional attention among in-flight
blocks, the same prompts and seeds are generated as with the sequential plan. Reported: PSNR and
SSIM of the frames against the sequential frames, and prompt adherence (color, shape, motion) of
each plan. One process runs the cascade's exact semantics (tests/parallel/test_cascade.py shows N ranks
give the same latents), so this measures quality, not speed.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from engine.devices import resolve_device
from engine.eval.adherence import adherence
from engine.eval.metrics import psnr, ssim
from launch.benchmarks.adherence import eval_prompts
from launch.benchmarks.common import generate_video, session_for
from launch.presets import get_preset

COLUMNS = ["plan", "context", "attention", "offset", "psnr_db", "ssim", "color", "shape", "motion"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="model preset")
    parser.add_argument("--prompts", type=int, default=12, help="videos per plan")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per video")
    parser.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 3], help="cascade offsets")
    parser.add_argument("--seed", type=int, default=0, help="first video's seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def plan_variants(offsets: list[int]) -> list[dict]:
    variants = [{"schedule": "sequential", "offset": None, "context": "joint", "attention": "causal"}]
    for offset in offsets:
        for context in ("joint", "lagged"):
            for attention in ("causal", "bidirectional"):
                variants.append({"schedule": "cascade", "offset": offset, "context": context, "attention": attention})
    return variants


def _videos(preset, variant: dict, prompts, blocks: int, seed: int, device) -> list[np.ndarray]:
    session = session_for(dataclasses.replace(preset, plan=dataclasses.replace(preset.plan, **variant)), device)
    return [generate_video(session, d.prompt, blocks, seed + i)[0] for i, d in enumerate(prompts)]


def run(args: argparse.Namespace):
    device, preset = resolve_device(args.device), get_preset(args.preset)
    prompts = eval_prompts(args.prompts)
    torch.manual_seed(args.seed)
    reference = None
    rows = []
    for variant in plan_variants(args.offsets):
        videos = _videos(preset, variant, prompts, args.blocks, args.seed, device)
        reference = reference if reference is not None else videos
        scores = [adherence(v, d) for v, d in zip(videos, prompts)]
        rows.append({
            "plan": variant["schedule"],
            "context": variant["context"] if variant["schedule"] == "cascade" else "-",
            "attention": variant["attention"],
            "offset": variant["offset"] or "-",
            "psnr_db": float(np.mean([psnr(v, r) for v, r in zip(videos, reference)])),
            "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, reference)])),
            "color": float(np.mean([s["color"] for s in scores])),
            "shape": float(np.mean([s["shape"] for s in scores])),
            "motion": float(np.mean([s["motion"] for s in scores])),
        })  # fmt: skip
    settings = {"preset": args.preset, "prompts": args.prompts, "blocks": args.blocks, "seed": args.seed}
    return rows, COLUMNS, settings
