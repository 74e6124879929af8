"""Feature caching on the demo model: speed and fidelity of every policy at several thresholds.

Two plans: a many-step one in SkyReels-V2's style (`--steps` evenly spaced Euler steps, pyramid
with `--offset`, so several blocks at different noise levels share each forward) and the
preset's own 4-step Self-Forcing plan (sequential). For each policy and threshold the same
prompts and seeds are generated as without caching. Reported: wall-clock speedup (generation and
decode, one stream at a time, this machine), the share of block-steps skipped and of FLOPs saved
(analytic, fbcache's probes counted as spent), PSNR/SSIM of the frames against the uncached
frames, and prompt adherence (color, shape, motion all right). `--compile default` runs every
setting through the compiled forward (engine/runtime/compiled.py): caching then saves from a
cheaper forward (policies that probe inside the forward, fbcache and bwcache, are refused there).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import replace

import numpy as np

from engine.config import CacheConfig, PlanConfig, SpeedConfig
from engine.devices import resolve_device
from engine.eval.adherence import adherence
from engine.eval.metrics import psnr, ssim
from engine.runtime.session import Session
from launch.benchmarks.adherence import eval_prompts
from launch.benchmarks.common import generate_video, session_for
from launch.presets import get_preset

COLUMNS = ["plan", "policy", "threshold", "speedup", "skipped", "flops_saved", "psnr_db", "ssim", "adherence"]

THRESHOLDS = {
    "teacache": [0.1, 0.3],
    "fbcache": [0.1, 0.2],
    "bwcache": [0.05, 0.1],
    "flowcache": [0.1, 0.2],
    "flowcache-skyreels": [0.1, 0.3],
    "scope": [0.05, 0.1],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="model preset")
    parser.add_argument("--prompts", type=int, default=6, help="videos per setting (prompts of the adherence set)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per video")
    parser.add_argument("--steps", type=int, default=30, help="steps of the many-step plan")
    parser.add_argument("--offset", type=int, default=5, help="pyramid offset of the many-step plan (ar_step)")
    parser.add_argument(
        "--plans",
        nargs="+",
        default=["many", "self-forcing"],
        choices=["many", "self-forcing"],
        help="many: a 30-step Euler pyramid; self-forcing: the preset's own 4-step plan",
    )
    parser.add_argument(
        "--policies", nargs="+", default=list(THRESHOLDS), choices=list(THRESHOLDS), help="policies to measure"
    )
    parser.add_argument(
        "--thresholds", nargs="+", type=float, default=None, help="thresholds for every policy (default: its own pair)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first video's seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument(
        "--compile", default="off", choices=("off", "default"), help="the forward eager or compiled (torch.compile)"
    )


def plan_preset(name: str, plan: str, steps: int, offset: int):
    preset = get_preset(name)
    if plan == "self-forcing":
        return preset
    sampling = dataclasses.replace(preset.sampling, timesteps=None, num_steps=steps, solver="euler")
    return dataclasses.replace(preset, sampling=sampling, plan=PlanConfig(schedule="pyramid", offset=offset))


def _generate(session: Session, prompts, blocks: int, seed: int, compiled: bool = False):
    """(videos, seconds, run stats). Compiled: the same videos once untimed first, so the timed run
    meets every graph its skip pattern needs already compiled."""
    if compiled:
        _generate(session, prompts, blocks, seed)
    videos, stats, seconds = [], [], 0.0
    for i, desc in enumerate(prompts):
        frames, run_stats, took = generate_video(session, desc.prompt, blocks, seed + i)
        videos.append(frames)
        stats.append(run_stats)
        seconds += took
    return videos, seconds, stats


def _row(plan, policy, threshold, videos, seconds, stats, reference, base_seconds, prompts) -> dict:
    skipped = [s.hit_rate for s in stats if s.hit_rate is not None]
    saved = [s.flops_saved_share for s in stats if s.hit_rate is not None]
    return {
        "plan": plan,
        "policy": policy,
        "threshold": threshold,
        "speedup": base_seconds / seconds,
        "skipped": float(np.mean(skipped)) if skipped else 0.0,
        "flops_saved": float(np.mean(saved)) if saved else 0.0,
        "psnr_db": float(np.mean([psnr(v, r) for v, r in zip(videos, reference)]))
        if policy != "none"
        else float("inf"),
        "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, reference)])),
        "adherence": float(np.mean([all(adherence(v, d).values()) for v, d in zip(videos, prompts)])),
        "seconds": seconds,
    }


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    prompts = eval_prompts(args.prompts)
    rows = []
    for plan in args.plans:
        preset = plan_preset(args.preset, plan, args.steps, args.offset)
        session = session_for(preset, device, speed=SpeedConfig(compile=args.compile))
        _generate(session, prompts[:1], 1, args.seed)  # warm up allocators and kernels
        compiled = args.compile != "off"
        reference, base, stats = _generate(session, prompts, args.blocks, args.seed, compiled)
        rows.append(_row(plan, "none", 0.0, reference, base, stats, reference, base, prompts))
        for policy in args.policies:
            for threshold in args.thresholds or THRESHOLDS[policy]:
                cached = session.reconfigured(replace(preset, cache=CacheConfig(policy=policy, threshold=threshold)))
                videos, seconds, stats = _generate(cached, prompts, args.blocks, args.seed, compiled)
                rows.append(_row(plan, policy, threshold, videos, seconds, stats, reference, base, prompts))
                print(
                    f"{plan} {policy} {threshold}: {rows[-1]['speedup']:.2f}x, {rows[-1]['psnr_db']:.1f} dB", flush=True
                )
    names = ("preset", "prompts", "blocks", "steps", "offset", "seed", "thresholds", "compile")
    settings = {k: getattr(args, k) for k in names}
    return rows, COLUMNS, settings
