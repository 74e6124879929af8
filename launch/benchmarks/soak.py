"""Soak: one endless stream for N minutes, sampling resident memory and generation speed over time.

A streaming engine must not grow or slow down as a stream goes on (KV ring, caches, decoder
state, per-block bookkeeping). Every `--every` seconds one row: the time, frames so far, the
video FPS over that interval (generation and decode), the process's resident memory and the
stream's KV cache size. The summary compares the rows after `--warmup` seconds: RSS growth
(last minus first, MB) and the FPS spread ((max - min) / mean of the interval FPS).

python -m launch.bench soak                  # 10 minutes of the demo model
python -m launch.bench soak --minutes 0.5    # a quick look
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from engine.devices import resolve_device
from engine.weight_paths import WeightPaths
from launch.benchmarks.common import session_for
from launch.presets import get_preset

COLUMNS = ["seconds", "frames", "fps", "cpu_fps", "rss_mb", "kv_mb"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="preset to stream")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the stream runs")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the summary")
    parser.add_argument("--prompt", default="a red circle moving left", help="the stream's prompt")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--weights", type=Path, default=None, help="a launch.train_demo folder (none: shipped)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(rows: list[dict], warmup: float) -> dict:
    """RSS growth and FPS spread over the rows after `warmup` seconds (all rows if none are)."""
    steady = [r for r in rows if r["seconds"] >= warmup] or rows
    summary = {"samples": len(steady), "rss_growth_mb": steady[-1]["rss_mb"] - steady[0]["rss_mb"]}
    for key in ("fps", "cpu_fps"):
        fps = np.array([r[key] for r in steady])
        summary[f"{key}_mean"] = float(fps.mean())
        summary[f"{key}_spread"] = float((fps.max() - fps.min()) / fps.mean())
        third = max(len(fps) // 3, 1)  # slowing down, apart from sample noise: last third vs first
        summary[f"{key}_change"] = float((fps[-third:].mean() - fps[:third].mean()) / fps.mean())
    return summary


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    paths = WeightPaths() if args.weights is None else WeightPaths.bundle(args.weights)
    session = session_for(get_preset(args.preset), device, paths)
    stream = session.run(args.prompt, blocks=None, seed=args.seed)
    rows, frames, interval_frames = [], 0, 0
    start = last = time.perf_counter()
    last_cpu = time.process_time()
    for _, decoded in stream.frames():
        frames += len(decoded)
        interval_frames += len(decoded)
        now = time.perf_counter()
        if now - last >= args.every or now - start >= 60 * args.minutes:
            cpu = time.process_time()
            rows.append({"seconds": round(now - start, 1), "frames": frames, "fps": interval_frames / (now - last),
                         "cpu_fps": interval_frames / max(cpu - last_cpu, 1e-9),
                         "rss_mb": rss_mb(), "kv_mb": stream.kv_bytes / 2**20})  # fmt: skip
            last, last_cpu, interval_frames = now, cpu, 0
        if now - start >= 60 * args.minutes:
            break
    summary = summarize(rows, args.warmup)
    print("summary: " + "  ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    settings = {k: getattr(args, k) for k in ("preset", "minutes", "every", "warmup", "prompt", "seed")}
    settings["weights"] = "shipped" if args.weights is None else args.weights.as_posix()
    settings["summary"] = summary
    settings["torch_threads"] = torch.get_num_threads()
    settings["load_1min"] = os.getloadavg()[0]
    return rows, COLUMNS, settings
