"""What the speed measurements share: device syncs, the matmul roof, the profiler's split of a
forward into attention / linear / rest, and the analytic FLOPs of the forwards a run made.

Used by `launch.bench speed` (one preset, one device) and `launch.bench gpu-report` (every
variant of the GPU report, each in its own process).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import Preset
from engine.families import forward_flops

ATTENTION_OPS = ("attention", "flash", "_efficient_attention", "cudnn_attention", "softmax", "baddbmm", "bmm")
LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::convolution", "gemm")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: only at the edges of a timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Dense matmul throughput on this device and dtype: the roof the forwards are compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def op_shares(prof, device: torch.device) -> dict[str, float]:
    """Shares of the profiled time spent in attention, linear layers and the rest, from each
    operator's self time (device time on a GPU, CPU time on a CPU)."""
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


def profiled_shares(work: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Run `work` (e.g. one block of a stream) under the profiler; its attention / linear / rest split."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        work()
        sync(device)
    return op_shares(prof, device)


def guidance_branches(preset: Preset) -> int:
    """Batch rows of one forward: 2 with classifier-free guidance (or MAGI-1's 3-pass CFG, whose
    passes run as a [cond, uncond] batch), else 1."""
    sampling = preset.sampling
    if sampling.magi is not None:
        return 2 if sampling.magi.passes == 3 else 1
    return 2 if sampling.guided else 1


def calls_flops(preset: Preset, calls: Counter, before: Counter | None = None) -> int:
    """Analytic FLOPs of the forwards in `calls` (RunStats.calls: (query frames, key frames) ->
    count) made since `before`, over every guidance branch."""
    before = before or Counter()
    T = preset.tokens_per_frame
    flops = sum(
        (n - before.get(shape, 0)) * forward_flops(preset.model, shape[0] * T, shape[1] * T, preset.text.text_len)
        for shape, n in calls.items()
    )  # fmt: skip
    return flops * guidance_branches(preset)


def steady_block_flops(preset: Preset) -> int:
    """A sequential plan's steady state, counted without running: each block takes S denoising
    forwards and one commit pass, its F * T query tokens against the whole window (context + itself)."""
    T, frames = preset.tokens_per_frame, preset.stream.frames_per_block
    forward = forward_flops(preset.model, frames * T, preset.stream.window_frames * T, preset.text.text_len)
    return (preset.sampling.steps + 1) * forward * guidance_branches(preset)


def limit_fps(preset: Preset, block_flops: float, tflops: float) -> float:
    """Frames per second if every FLOP of a block ran at `tflops` (the analytic limit)."""
    frames = preset.vae.temporal_stride * preset.stream.frames_per_block  # steady-state frames per block
    return frames * tflops * 1e12 / block_flops
