"""Compiled vs eager forward (--compile default) on this device: steady-state time per tick and compile time.

For each preset two sessions of the same weights, one eager and one compiled (torch.compile with
inductor, whole graph), step their own endless stream tick by tick, alternately, so that both see
the same machine load and the ratio comes from one run. The first `--warmup` ticks fill the
attention window (the compiled session compiles one graph per window layout there, counted); the
next `--ticks` ticks are the steady state: the median ms per tick of each, their ratio, and the
graphs compiled during them (0 when nothing recompiles). Ticks are the executor's (forward +
solver step), without decoding. Threads and the load average are stated; nothing is asserted.

python -m launch.bench compile
python -m launch.bench compile --presets demo mid-wan --warmup 20 --ticks 30
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python -m launch.bench compile    # compile time from cold
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch._dynamo.utils import counters

from engine.config import SpeedConfig
from engine.devices import resolve_device
from engine.plan.timeline import blocks_per_tick
from engine.runtime.session import Session
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from launch.benchmarks.common import session_for
from launch.presets import get_preset

COLUMNS = ["preset", "params_m", "threads", "eager_ms", "compiled_ms", "speedup", "compile_s", "graphs",
           "recompiles_steady", "max_diff", "load_before", "load_after"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["demo", "mid-wan"], help="models to measure")
    parser.add_argument("--warmup", type=int, default=20, help="ticks while the window fills (compiles here)")
    parser.add_argument("--ticks", type=int, default=30, help="steady-state ticks measured")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--seed", type=int, default=0, help="the streams' seed")


class Stepper:
    """One session's endless stream, stepped a tick at a time and timed."""

    def __init__(self, session: Session, seed: int):
        plan = session.preset.plan
        offset = None if plan.schedule == "sequential" else plan.offset
        in_forward = blocks_per_tick(session.schedule, offset, None)
        self.executor = session.executors(NoiseSource(seed), blocks_in_forward=in_forward)
        self.text = session.prompts.conditioning("a red circle moving left")
        self.ticks = iter(session.plan(None))
        self.seconds: list[float] = []
        self.blocks: list[torch.Tensor] = []
        self.executor.start()

    def step(self, device: torch.device) -> None:
        start = time.perf_counter()
        finished = self.executor.step(next(self.ticks), self.text)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds.append(time.perf_counter() - start)
        self.blocks += [block.latents for block in finished]


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    preset = get_preset(name)
    weights = WeightPaths(random=True, seed=3) if preset.bundled_weights is None else None
    eager = Stepper(session_for(preset, device, weights), args.seed)
    session = session_for(preset, device, weights, speed=SpeedConfig(compile="default"))
    torch._dynamo.reset()
    counters.clear()
    compiled = Stepper(session, args.seed)
    for _ in range(args.warmup):
        eager.step(device)
        compiled.step(device)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(args.ticks):
        eager.step(device)
        compiled.step(device)
    eager_ms = 1000 * float(np.median(eager.seconds[args.warmup :]))
    compiled_ms = 1000 * float(np.median(compiled.seconds[args.warmup :]))
    done = min(len(eager.blocks), len(compiled.blocks))
    diff = max((a - b).abs().max().item() for a, b in zip(eager.blocks[:done], compiled.blocks[:done]))
    return {
        "preset": name,
        "params_m": sum(p.numel() for p in session.model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "compile_s": sum(compiled.seconds[: args.warmup]) - sum(eager.seconds[: args.warmup]),
        "graphs": graphs,
        "recompiles_steady": counters["stats"]["unique_graphs"] - graphs,
        "max_diff": diff,
    }


def run(args: argparse.Namespace) -> tuple[list[dict], list[str], dict]:
    device = resolve_device(args.device)
    rows = []
    for name in args.presets:
        before = os.getloadavg()[0]
        row = measure(name, args, device)
        rows.append({**row, "load_before": before, "load_after": os.getloadavg()[0]})
        print(f"{name}: eager {row['eager_ms']:.1f} ms/tick, compiled {row['compiled_ms']:.1f} ms/tick", flush=True)
    settings = {
        "device": str(device),
        "warmup_ticks": args.warmup,
        "ticks": args.ticks,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "inductor_caches": "disabled"
        if os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1"
        else "on (a repeat run reuses compiled kernels from disk, so its compile_s is lower)",
        "note": "median ms per tick (forward + solver step, no decode) of eager and compiled sessions stepped "
        "alternately; compile_s = the compiled session's warm-up ticks minus the eager one's; load = 1-min average",
    }
    return rows, COLUMNS, settings
