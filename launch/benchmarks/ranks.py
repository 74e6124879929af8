"""Ranks on this CPU: one process, a 2-rank cascade and 2-rank sequence parallelism, measured.

Each row runs `python -m engine.generate` (or torchrun of it) for `--blocks` blocks and reads the
FPS it prints (generation and decode). Two ways to give the ranks cores:
* pinned: every rank on its own core with one thread (`taskset`), the way each GPU of a machine
  runs one rank; the one-process baseline then has one core too. This is the comparison that
  predicts the shape of a multi-GPU run (not its size: gloo on loopback is not NVLink).
* shared: one thread per process, no pinning, so both ranks and the single process compete for
  the same two cores (the earlier README rows).
Every rank is one process of 1 thread in both cases; what differs is who may run where. The
speedups are ratios within one run of this command; the machine's load is reported with them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

COLUMNS = ["preset", "cores", "run", "fps", "vs_1_process"]
RUNS = {
    "1 process, pyramid offset 1": ([], 1),
    "2 ranks, cascade offset 1, joint": (["--schedule", "cascade", "--context", "joint"], 2),
    "2 ranks, cascade offset 1, lagged": (["--schedule", "cascade", "--context", "lagged"], 2),
    "2 ranks, 1 stage x sp 2": (["--schedule", "cascade", "--sp", "2"], 2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["demo", "mid-wan"], help="models to run")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per run")
    parser.add_argument("--placements", nargs="+", default=["pinned", "shared"], choices=["pinned", "shared"],
                        help="pinned: one core per rank; shared: every process may use every core")  # fmt: skip


def _command(preset: str, blocks: int, extra: list[str], ranks: int, pinned: bool) -> list[str]:
    generate = ["-m", "engine.generate", "--preset", preset, "--blocks", str(blocks), "--threads", "1",
                "--out", f"out/bench-ranks-{ranks}.mp4", "--schedule", "pyramid", "--offset", "1", *extra]  # fmt: skip
    if ranks == 1:
        return (["taskset", "-c", "0"] if pinned else []) + [sys.executable, *generate]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    if not pinned:
        return [*launch, *generate]
    # torchrun sets LOCAL_RANK for each worker: the shell pins that worker to that core
    inner = "exec taskset -c $LOCAL_RANK " + shlex.join([sys.executable, *generate])
    return [*launch, "--no-python", "sh", "-c", inner]


def _fps(command: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    match = re.search(r"\(([\d.]+) FPS", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr[-2000:]}")
    return float(match.group(1))


def run(args: argparse.Namespace):
    rows = []
    for preset in args.presets:
        for placement in args.placements:
            pinned = placement == "pinned"
            fps = {name: _fps(_command(preset, args.blocks, extra, ranks, pinned))
                   for name, (extra, ranks) in RUNS.items()}  # fmt: skip
            base = fps["1 process, pyramid offset 1"]
            cores = "1 per rank (taskset)" if pinned else "2, shared"
            rows += [{"preset": preset, "cores": cores, "run": name, "fps": value, "vs_1_process": value / base}
                     for name, value in fps.items()]  # fmt: skip
    settings = {"blocks": args.blocks, "threads_per_process": 1, "load_average": os.getloadavg()}
    return rows, COLUMNS, settings
