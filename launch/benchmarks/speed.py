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
from torch.profiler import ProfilerActivity, profile

from engine.loading import WeightPaths, resolve_device, resolve_dtype
from engine.models.flops import forward_flops
from engine.runtime.session import Session
from launch.build import build_session
from launch.presets import get_preset

COLUMNS = ["preset", "device", "dtype", "fps", "forward_ms", "attention", "linear", "rest", "tflops", "peak", "kv_gib"]
ATTENTION_OPS = ("attention", "flash", "_efficient_attention", "cudnn_attention", "softmax", "baddbmm", "bmm")
LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::convolution", "gemm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="self-forcing-1.3b", help="model preset")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights (timing only)")
    parser.add_argument("--warmup", type=int, default=2, help="blocks run before timing")
    parser.add_argument("--blocks", type=int, default=4, help="blocks timed")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Dense matmul throughput on this device and dtype: the roof the forwards are compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def time_split(session: Session, device: torch.device) -> dict[str, float]:
    """Shares of one block's forward time spent in attention, linear layers and the rest."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in session.run("a red circle moving left", blocks=1, seed=1):
            pass
        _sync(device)
    shares = {"attention": 0.0, "linear": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        spent = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        name = event.key.lower()
        if any(op in name for op in ATTENTION_OPS):
            shares["attention"] += spent
        elif any(op in name for op in LINEAR_OPS):
            shares["linear"] += spent
        elif name.startswith("aten::") or device.type == "cuda":
            shares["rest"] += spent
    total = sum(shares.values()) or 1.0
    return {k: v / total for k, v in shares.items()}


def measure(preset_name: str, device: torch.device, dtype: torch.dtype, weights: WeightPaths, warmup: int, blocks: int):
    preset = get_preset(preset_name)
    session = build_session(preset, weights, device, dtype)
    stream = session.run("a red circle moving left", blocks=warmup + blocks, seed=0)
    for _ in range(warmup):
        next(stream)
    _sync(device)
    forwards_before, calls_before = stream.stats.forwards, dict(stream.stats.calls)
    start = time.perf_counter()
    for _ in stream:
        pass
    _sync(device)
    seconds = time.perf_counter() - start
    stats = stream.stats
    forwards = stats.forwards - forwards_before
    T, branches = preset.tokens_per_frame, 2 if preset.sampling.guided else 1
    flops = sum(
        (n - calls_before.get(shape, 0)) * forward_flops(preset.model, shape[0] * T, shape[1] * T, preset.text.text_len)
        for shape, n in stats.calls.items()
    ) * branches  # fmt: skip
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
