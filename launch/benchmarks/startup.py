"""Startup: seconds from a command's process start to its first answer, median of --repeats runs.

    python -m launch.bench startup                 # --help, a refused flag, the demo's first frame
    python -m launch.bench startup --repeats 3 --threads 1

Each case is a fresh `python -m engine.generate ...` process, timed from its start (spawn) to its
exit, so the time includes the interpreter, every import and the teardown:
* help: `--help`;
* user_error: `--preset no-such-preset`, refused in one line (exit code 2);
* first_frame: `--blocks 1 --out <tmp>.mp4` on the demo preset: the process exits once the first
  block is generated, decoded and its frames written to the MP4, so its wall time is the time
  from the command to the first frame on disk (an upper bound: it includes closing the file and
  the interpreter's exit). `in_process_s` is what the command itself prints as "first frame
  after": from after its imports and flag parsing to the first decoded frame.
Children run with OMP_NUM_THREADS=--threads (default: as this process was started). Targets on
a quiet 2-core machine: help and user_error <= 1.5 s, first_frame <= 3 s; the load average, said
before and after, tells how quiet it was.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.config import ConfigError

COLUMNS = ["case", "median_s", "min_s", "max_s", "in_process_s", "exit_code", "command"]
CASES = {
    "help": ["--help"],
    "user_error": ["--preset", "no-such-preset"],
    "first_frame": ["--blocks", "1"],
}
FIRST_FRAME = re.compile(r"first frame after ([0-9.]+) s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases measured")


def run(args: argparse.Namespace) -> tuple[list[dict], list[str], dict]:
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        rows = [_case(name, args.repeats, env, Path(folder)) for name in args.cases]
    settings = dict(threads=env.get("OMP_NUM_THREADS", "default"), load_average_before=load_before,
                    load_average_after=os.getloadavg(), cores=os.cpu_count(), repeats=args.repeats,
                    python=sys.executable)  # fmt: skip
    print(f"OMP_NUM_THREADS={settings['threads']}; load average {load_before[0]:.2f} before, "
          f"{settings['load_average_after'][0]:.2f} after, on {settings['cores']} cores")  # fmt: skip
    return rows, COLUMNS, settings


def _case(name: str, repeats: int, env: dict, folder: Path) -> dict:
    flags = CASES[name] + (["--out", str(folder / "first.mp4")] if name == "first_frame" else [])
    command = [sys.executable, "-m", "engine.generate", *flags]
    times, inside, codes = [], [], set()
    for _ in range(repeats):
        seconds, code, output = _timed(command, env)
        times.append(seconds)
        codes.add(code)
        if found := FIRST_FRAME.search(output):
            inside.append(float(found.group(1)))
    return dict(case=name, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                in_process_s=statistics.median(inside) if inside else "",
                exit_code="/".join(str(c) for c in sorted(codes)),
                command="python -m engine.generate " + " ".join(CASES[name]))  # fmt: skip


def _timed(command: list[str], env: dict) -> tuple[float, int, str]:
    """Seconds from spawning `command` to its exit, its exit code, its stdout and stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, done.returncode, done.stdout + done.stderr
