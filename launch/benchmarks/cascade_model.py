"""A throughput model of Block Cascading, and the speedup measured on this machine.

Model. A block takes S denoising forwards plus a commit pass. Sequentially one GPU emits a block
every (S + 1) forwards. A cascade with offset o keeps n = floor(S / o) + 1 blocks in flight, one
per rank when there are enough ranks, and emits a block every o ticks; a tick costs
* compute: ceil(n / ranks) block-forwards (blocks sharing a rank run as one forward), each dearer
  than a sequential one because its queries also attend to the other in-flight blocks (scaled by
  the analytic FLOPs of engine/flops.py: at 480x832 attention is most of a forward), plus
* joint context: at every layer an all-gather of the in-flight blocks' K/V, on the critical path;
  lagged context: one all-gather of every layer's K/V per tick, overlapped with compute.
A ring all-gather moves (ranks - 1) contributions through each link: time = (ranks - 1) *
(bytes / bandwidth + latency). Decoding runs on its own rank and is not modelled, nor are kernel
efficiencies at different sizes: the model is an upper bound to check measurements against.

The per-forward time comes from a measurement (`--forward-ms PRESET=MS`, e.g. from a GPU) or
from a published single-GPU throughput (Self-Forcing 1.3B: 16.5 FPS on one H100; the 14B
Self-Forcing-style model of the Block Cascading paper: 4.5 FPS): t = frames / (FPS * (S + 1)).

Measured. `--measure` runs the demo model here: one process (sequential and pyramid) against
`torchrun --nproc_per_node=2` (cascade, joint and lagged), FPS as printed by launch.generate.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from dataclasses import dataclass

from engine.models.flops import forward_flops
from launch.presets import get_preset

COLUMNS = ["preset", "link", "ranks", "offset", "context", "tick_ms", "comm_ms", "fps", "speedup"]
ANCHOR_FPS = {"self-forcing-1.3b": 16.5, "wan-14b-causal": 4.5}  # one H100, published
PUBLISHED = {"self-forcing-1.3b": "16-17 FPS on 1 H100; Block Cascading: 30 FPS on 5 GPUs",
             "wan-14b-causal": "4.5 FPS on 1 H100; Block Cascading: 12.5 FPS on 5 GPUs"}  # fmt: skip


@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float
    latency_us: float


LINKS = (Link("NVLink (H100, 450 GB/s per direction)", 450.0, 10.0), Link("PCIe 5.0 x16 (~50 GB/s)", 50.0, 25.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--presets", nargs="+", default=list(ANCHOR_FPS), help="presets to model (those with a published anchor)"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8], help="GPU counts to model")
    parser.add_argument("--offsets", type=int, nargs="+", default=[1, 2], help="cascade offsets to model")
    parser.add_argument("--forward-ms", nargs="*", default=[], help="PRESET=MS measured per-block forward times")
    parser.add_argument("--measure", action="store_true", help="also measure 1 vs 2 ranks on this machine")
    parser.add_argument("--measure-blocks", type=int, default=16, help="blocks per measured run")
    parser.add_argument("--measure-cache", help="POLICY:THRESHOLD: also measure caching with the cascade")


def block_forward_s(preset_name: str, measured: dict[str, float]) -> float:
    if preset_name in measured:
        return measured[preset_name] / 1000
    preset = get_preset(preset_name)
    frames = preset.vae.temporal_stride * preset.stream.frames_per_block  # steady-state frames per block
    return frames / (ANCHOR_FPS[preset_name] * (preset.sampling.steps + 1))


def kv_bytes_per_layer(preset) -> int:
    """K and V of one block for one layer, bf16."""
    return 2 * preset.stream.frames_per_block * preset.tokens_per_frame * preset.model.dim * 2


def context_cost(preset, in_flight: int) -> float:
    """Forward cost of a cascaded block relative to a sequential one (more keys to attend to)."""
    T, block = preset.tokens_per_frame, preset.stream.frames_per_block
    window = preset.stream.window_frames
    sequential = forward_flops(preset.model, block * T, window * T, preset.text.text_len)
    cascaded = forward_flops(preset.model, block * T, (window + (in_flight - 1) * block) * T, preset.text.text_len)
    return cascaded / sequential


def tick_time(preset, forward_s: float, ranks: int, offset: int, context: str, link: Link) -> tuple[float, float]:
    """(tick seconds, communication seconds) of a cascade tick."""
    steps = preset.sampling.steps
    in_flight = steps // offset + 1 if offset else steps + 1
    ranks = min(ranks, in_flight)  # more ranks than blocks in flight would idle
    compute = math.ceil(in_flight / ranks) * forward_s * context_cost(preset, in_flight)
    if ranks == 1:
        return compute, 0.0
    per_block = kv_bytes_per_layer(preset) * math.ceil(in_flight / ranks)
    hop = lambda size: size / (link.gbytes_per_s * 1e9) + link.latency_us * 1e-6  # noqa: E731
    layers = preset.model.num_layers
    if context == "joint":
        comm = layers * (ranks - 1) * hop(per_block)
        return compute + comm, comm
    comm = (ranks - 1) * hop(per_block * layers)
    return max(compute, comm), comm


def model_rows(args: argparse.Namespace) -> list[dict]:
    measured = {k: float(v) for k, v in (item.split("=") for item in args.forward_ms)}
    rows = []
    for name in args.presets:
        preset, forward_s = get_preset(name), block_forward_s(name, measured)
        frames = preset.vae.temporal_stride * preset.stream.frames_per_block
        sequential_fps = frames / ((preset.sampling.steps + 1) * forward_s)
        rows.append({"preset": name, "link": "-", "ranks": 1, "offset": "sequential", "context": "-",
                     "tick_ms": 1000 * forward_s, "comm_ms": 0.0, "fps": sequential_fps, "speedup": 1.0,
                     "published": PUBLISHED.get(name, "")})  # fmt: skip
        for link in LINKS:
            for ranks in [r for r in args.ranks if r > 1]:
                for offset in [o for o in args.offsets if ranks <= preset.sampling.steps // o + 1]:
                    for context in ("joint", "lagged"):
                        tick, comm = tick_time(preset, forward_s, ranks, offset, context, link)
                        fps = frames / (offset * tick)
                        rows.append({"preset": name, "link": link.name, "ranks": ranks, "offset": offset,
                                     "context": context, "tick_ms": 1000 * tick, "comm_ms": 1000 * comm,
                                     "fps": fps, "speedup": fps / sequential_fps})  # fmt: skip
    return rows


def _generate_fps(command: list[str]) -> float:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    match = re.search(r"\(([\d.]+) FPS", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return float(match.group(1))


def measured_rows(blocks: int, cache: str | None = None) -> list[dict]:
    """The demo model on this machine: one process vs a 2-rank cascade (same cores). With `cache`
    (POLICY:THRESHOLD), also a 30-step pyramid (offset 5) with and without that cache, on one
    process and on 2 ranks: caching and cascading should multiply."""
    base = ["-m", "launch.generate", "--preset", "demo", "--blocks", str(blocks), "--out"]
    single = [sys.executable, *base, "out/bench-1.mp4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base,
                "out/bench-2.mp4", "--schedule", "cascade"]  # fmt: skip
    runs = {
        "1 process, sequential": single,
        "1 process, pyramid offset 1": [*single, "--schedule", "pyramid", "--offset", "1"],
        "2 ranks, cascade offset 1 joint": [*torchrun, "--offset", "1", "--context", "joint"],
        "2 ranks, cascade offset 1 lagged": [*torchrun, "--offset", "1", "--context", "lagged"],
    }
    if cache:
        policy, threshold = cache.split(":")
        many = ["--steps", "30", "--solver", "euler", "--offset", "5"]
        cached = ["--cache", policy, "--cache-threshold", threshold]
        runs |= {
            "1 process, 30-step pyramid offset 5": [*single, "--schedule", "pyramid", *many],
            f"1 process, 30-step pyramid + {policy} {threshold}": [*single, "--schedule", "pyramid", *many, *cached],
            "2 ranks, 30-step cascade joint": [*torchrun, *many],
            f"2 ranks, 30-step cascade joint + {policy} {threshold}": [*torchrun, *many, *cached],
        }
    fps = {name: _generate_fps(command) for name, command in runs.items()}
    reference = {name: fps["1 process, 30-step pyramid offset 5" if "30-step" in name else "1 process, sequential"]
                 for name in fps}  # fmt: skip
    return [{"preset": "demo (this CPU)", "link": "gloo, same host", "ranks": 2 if "ranks" in n else 1, "offset": n,
             "context": "-", "tick_ms": float("nan"), "comm_ms": float("nan"), "fps": v, "speedup": v / reference[n]}
            for n, v in fps.items()]  # fmt: skip


def run(args: argparse.Namespace):
    rows = model_rows(args)
    if args.measure:
        rows += measured_rows(args.measure_blocks, args.measure_cache)
    settings = {"anchors_fps": ANCHOR_FPS, "links": [link.__dict__ for link in LINKS]}
    return rows, COLUMNS, settings
