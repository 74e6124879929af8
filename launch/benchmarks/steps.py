"""Fewer denoising steps on a few-step model: what each step count costs in fidelity and buys in speed.

The session scheduler's fidelity lever for few-step plans (engine/plan/steps.py): the same prompts
and seeds are generated with the preset's trained timesteps and with subsets of them (4 -> 3 -> 2
-> 1 for Self-Forcing's 4: the first S' - 1 trained timesteps and the last). An entry
of `--steps` may also name timesteps outright (`1000,500`) to compare other subsets. Reported:
PSNR and SSIM of whole videos against the full step count (errors compound over blocks, so a
session lowered for a few blocks loses less), prompt adherence (color, shape, motion read back;
all three right), forwards per block (S + 1: the commit), and the speedup in CPU seconds of one
stream at a time (generation and decode, one torch thread: other processes on a shared machine
slow the wall clock, far less the CPU time), with the torch threads and the machine's load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from engine.config import ConfigError
from engine.devices import resolve_device
from engine.eval.adherence import adherence
from engine.eval.metrics import psnr, ssim
from engine.plan.steps import fewer_steps, subset
from launch.benchmarks.adherence import eval_prompts
from launch.benchmarks.common import generate_video, session_for
from launch.presets import get_preset

COLUMNS = ["steps", "timesteps", "forwards_per_block", "cpu_speedup", "psnr_db", "ssim", "color", "shape", "motion",
           "all_three"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="a few-step model preset (explicit timesteps)")
    parser.add_argument("--prompts", type=int, default=8, help="videos per step count (prompts of the adherence set)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per video")
    parser.add_argument(
        "--steps", nargs="+", default=["4", "3", "2", "1"], help="step counts, or timesteps spelled out (1000,500)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first video's seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def _timesteps(preset, entry: str) -> tuple[float, ...]:
    """The trained timesteps an entry of --steps names (the schedule warps them, as the full plan's)."""
    try:
        parsed = tuple(float(t) for t in entry.split(",")) if "," in entry else int(entry)
    except ValueError:
        raise ConfigError(f"--steps {entry}: a step count (2) or timesteps (1000,500)") from None
    if isinstance(parsed, tuple):
        dataclasses.replace(preset.sampling, timesteps=parsed)  # refuses timesteps out of order or range
        return parsed
    fewer_steps(preset.sampling, parsed)  # refuses a count this sampling setup cannot run
    return subset(preset.sampling.timesteps, parsed)


def _generate(session, prompts, blocks: int, seed: int) -> tuple[list[np.ndarray], float]:
    """The videos and the CPU seconds they took (generation and decode)."""
    start, videos = time.process_time(), []
    for i, desc in enumerate(prompts):
        videos.append(generate_video(session, desc.prompt, blocks, seed + i)[0])
    return videos, time.process_time() - start


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    preset = get_preset(args.preset)
    if preset.sampling.timesteps is None:
        raise ConfigError(f"{args.preset} has no explicit timesteps: the step lever is for few-step models")
    subsets = [_timesteps(preset, entry) for entry in args.steps]  # bad entries refused before any work
    prompts = eval_prompts(args.prompts)
    session = session_for(preset, device)
    _generate(session, prompts[:1], 1, args.seed)  # warm up allocators and kernels
    reference, base = _generate(session, prompts, args.blocks, args.seed)
    rows = []
    for timesteps in subsets:
        sampling = dataclasses.replace(preset.sampling, timesteps=timesteps)
        fewer = session.reconfigured(dataclasses.replace(preset, sampling=sampling))
        videos, seconds = _generate(fewer, prompts, args.blocks, args.seed)
        rows.append(_row(timesteps, videos, seconds, reference, base, prompts))
        row = rows[-1]
        print(f"{len(timesteps)} steps {timesteps}: {row['psnr_db']:.1f} dB, {row['cpu_speedup']:.2f}x", flush=True)
    settings = {k: getattr(args, k) for k in ("preset", "prompts", "blocks", "steps", "seed")}
    settings.update(device=str(device), torch_threads=torch.get_num_threads(), cores=os.cpu_count(),
                    load_average=os.getloadavg())  # fmt: skip
    print(f"torch threads {settings['torch_threads']}, {settings['cores']} cores, load average "
          f"{settings['load_average'][0]:.2f} (speedups in CPU seconds)")  # fmt: skip
    return rows, COLUMNS, settings


def _row(timesteps, videos, seconds, reference, base_seconds, prompts) -> dict:
    scores = [adherence(v, d) for v, d in zip(videos, prompts)]
    identical = all(np.array_equal(v, r) for v, r in zip(videos, reference))
    return {
        "steps": len(timesteps),
        "timesteps": ",".join(f"{t:g}" for t in timesteps),
        "forwards_per_block": len(timesteps) + 1,
        "cpu_speedup": base_seconds / seconds,
        "psnr_db": float("inf") if identical else float(np.mean([psnr(v, r) for v, r in zip(videos, reference)])),
        "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, reference)])),
        "color": float(np.mean([s["color"] for s in scores])),
        "shape": float(np.mean([s["shape"] for s in scores])),
        "motion": float(np.mean([s["motion"] for s in scores])),
        "all_three": float(np.mean([all(s.values()) for s in scores])),
        "cpu_seconds": seconds,
    }
