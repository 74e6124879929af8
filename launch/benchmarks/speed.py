"""Steady-state speed of one stream on one device: video FPS, per-forward time split, TFLOP/s.

    python -m launch.bench speed --preset self-forcing-1.3b --device cuda --random-weights
    python -m launch.bench speed --preset tiny-wan                  # the same code path on a CPU

Timing does not depend on the weights, so real-size presets run with seeded random weights.
The preset's plan (sequential Self-Forcing for the Wan presets) runs `--warmup` blocks first,
then `--blocks` timed blocks (latents only: decoding is a separate stream of work). Reported:
* video FPS (pixel frames of the timed blocks per second) and ms per transformer forward;
* the forward's time split into attention, linear layers and the rest, from the profiler's
  per-operator self time (device time on a GPU, CPU time on a CPU);
* achieved TFLOP/s (analytic FLOPs of the forwards that ran, engine/flops.py) against the peak
  of a dense matmul measured on the same device and dtype;
* KV-cache memory of the stream.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.devices import resolve_device, resolve_dtype
from engine.runtime.session import Session
from engine.weight_paths import WeightPaths
from launch.benchmarks.timing import calls_flops, matmul_peak_tflops, profiled_shares, sync
from launch.build import build_session
from launch.presets import get_preset

COLUMNS = ["preset", "device", "dtype", "fps", "forward_ms", "attention", "linear", "rest", "tflops", "peak", "kv_gib"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="self-forcing-1.3b", help="model preset")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights (timing only)")
    parser.add_argument("--warmup", type=int, default=2, help="blocks run before timing")
    parser.add_argument("--blocks", type=int, default=4, help="blocks timed")


def time_split(session: Session, device: torch.device) -> dict[str, float]:
    """Shares of one block's forward time spent in attention, linear layers and the rest."""

    def one_block() -> None:
        for _ in session.run("a red circle moving left", blocks=1, seed=1):
            pass

    return profiled_shares(one_block, device)


def measure(preset_name: str, device: torch.device, dtype: torch.dtype, weights: WeightPaths, warmup: int, blocks: int):
    preset = get_preset(preset_name)
    session = build_session(preset, weights, device, dtype)
    stream = session.run("a red circle moving left", blocks=warmup + blocks, seed=0)
    for _ in range(warmup):
        next(stream)
    sync(device)
    forwards_before, calls_before = stream.stats.forwards, stream.stats.calls.copy()
    start = time.perf_counter()
    for _ in stream:
        pass
    sync(device)
    seconds = time.perf_counter() - start
    stats = stream.stats
    forwards = stats.forwards - forwards_before
    flops = calls_flops(preset, stats.calls, calls_before)
    frames = preset.pixel_frames(warmup + blocks) - preset.pixel_frames(warmup)
    kv = stream.kv_bytes
    return session, {
        "fps": frames / seconds,
        "forward_ms": 1000 * seconds / max(forwards, 1),
        "tflops": flops / seconds / 1e12,
        "kv_gib": kv / 2**30,
    }


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    weights = WeightPaths(random=args.random_weights)
    with torch.no_grad():
        session, row = measure(args.preset, device, dtype, weights, args.warmup, args.blocks)
        row |= time_split(session, device)
        row["peak"] = matmul_peak_tflops(device, dtype)
    row |= {"preset": args.preset, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    settings = {k: getattr(args, k) for k in ("preset", "device", "dtype", "random_weights", "warmup", "blocks")}
    return [row], COLUMNS, settings
