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

Splits (launch/throughput.py, launch/split.py). Each cascade stage may be a Ulysses sequence-
parallel group of N ranks, and one rank may only decode. Printed first: the all-to-all bytes per
layer, every cascade x sp (+ decode rank) split of `--gpus` on each of `--links`, ideal and
modelled; two machines (NVLink inside, InfiniBand between) with either dimension crossing; and
the split launch/split.py picks for each count and link. The rows below them are the cascade
alone (sp 1, decoding left out) as above; sp 1 in the split model reproduces them exactly.

Measured. `--measure` runs the demo model here: one process (sequential and pyramid) against
`torchrun --nproc_per_node=2` (cascade, joint and lagged), FPS as printed by launch.generate.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from launch.benchmarks import split_table
from launch.presets import get_preset
from launch.report import table
from launch.throughput import (
    ANCHOR_FPS,
    DECODE_S,
    LINKS,
    NVLINK,
    PCIE,
    PUBLISHED,
    block_forward_s,
    cascade_tick,
    context_cost,  # noqa: F401  (the cascade model's primitives, re-exported)
    kv_bytes_per_layer,  # noqa: F401
)

COLUMNS = ["preset", "link", "ranks", "offset", "context", "tick_ms", "comm_ms", "fps", "speedup"]
CASCADE_LINKS = (NVLINK, PCIE)


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
    split = parser.add_argument_group("splits: cascade x sequence parallelism (+ decode rank)")
    split.add_argument("--gpus", type=int, nargs="+", default=[4, 5, 8], help="GPU counts for the split table")
    split.add_argument("--sp", type=int, nargs="+", help="sp sizes for the split table; none = every factorisation")
    split.add_argument("--links", nargs="+", choices=list(LINKS), default=list(LINKS), help="links for the splits")
    split.add_argument("--split-offset", type=int, default=1, help="cascade offset (one stage runs sequentially)")
    split.add_argument("--split-context", choices=["joint", "lagged"], default="joint", help="cascade context")
    split.add_argument("--decode-ms", type=float, default=round(1000 * DECODE_S, 1),
                       help="one block's VAE decode (12 frames, 480x832); 0 leaves decoding out")  # fmt: skip
    split.add_argument("--sp-efficiency", choices=["waves", "ideal"], default="waves",
                       help="small shards: charge waves of tiles on 132 SMs, or assume perfect 1/N")  # fmt: skip
    split.add_argument("--sp-overhead-ms", type=float, default=0.0,
                       help="fixed extra per sp forward beyond bytes / bandwidth (a measured overhead)")  # fmt: skip
    split.add_argument("--node-gpus", type=int, default=4, help="GPUs per machine in the two-machine table")
    split.add_argument("--objective", choices=["fps", "latency"], default="fps", help="what the split chooser ranks")


def tick_time(preset, forward_s: float, ranks: int, offset: int, context: str, link) -> tuple[float, float]:
    """(tick seconds, communication seconds) of a cascade tick: throughput.cascade_tick at sp 1."""
    tick, _, _, comm = cascade_tick(preset, forward_s, ranks, 1, offset, context, link)
    return tick, comm


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
        for link in CASCADE_LINKS:
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


def split_tables(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Print the split tables (launch/benchmarks/split_table.py); return them for the JSON."""
    measured = {k: float(v) for k, v in (item.split("=") for item in args.forward_ms)}
    forward = {name: block_forward_s(name, measured) for name in args.presets}
    tables = {
        "bytes": split_table.bytes_rows(args.presets, args.sp or [2, 4, 5, 8]),
        "splits": split_table.split_rows(args, forward),
        "two_machines": split_table.node_rows(args, forward),
        "choices": split_table.choice_rows(args, forward),
    }
    print("Ulysses bytes per layer and rank (bf16), and sp communication per forward:")
    print(table(tables["bytes"], split_table.BYTES_COLUMNS) + "\n")
    print(f"Splits of {', '.join(map(str, args.gpus))} GPUs (modelled; a 'note' means the launcher refuses it):")
    print(table(tables["splits"], split_table.SPLIT_COLUMNS) + "\n")
    print(f"Two machines of {args.node_gpus} GPUs (NVLink inside, InfiniBand between):")
    print(table(tables["two_machines"], split_table.NODE_COLUMNS) + "\n")
    print("Split chooser (launch/split.py):")
    print("\n".join(row["reason"] for row in tables["choices"]) + "\n")
    print("Cascade only (sp 1; decoding left out), as before:")
    return tables


def run(args: argparse.Namespace):
    tables = split_tables(args)
    rows = model_rows(args)
    if args.measure:
        rows += measured_rows(args.measure_blocks, args.measure_cache)
    options = {key: getattr(args, key) for key in ("decode_ms", "split_offset", "split_context", "sp_efficiency")}
    settings = {"anchors_fps": ANCHOR_FPS, "links": {k: link.__dict__ for k, link in LINKS.items()}, **options,
                "sp_overhead_ms": args.sp_overhead_ms, "tables": tables}  # fmt: skip
    return rows, COLUMNS, settings
