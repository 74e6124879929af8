"""The serve bench's rank-group layouts: the real sessions server on K replicas of G ranks each.

    python -m launch.bench serve --layouts 1x5 5x1 --offered 3

Each layout is a real `engine.stream` sessions server (launch/stream.py) started as K x G local
processes with torchrun's environment (gloo on loopback, one torch thread each), `--replicas K`,
and for groups of G > 1 ranks the cascade plan at offset 1 (`KxGsp`: sp G instead). The same
Poisson trace of WebSocket viewers (launch/benchmarks/serve_clients.py) runs against every layout
at the same offered load (`--offered` sessions: arrival rate x mean watch time), and each layout
admits by its own measured speed. Per layout: sessions admitted and refused, Continuous Play
Ratio, time to first frame p50/p99 and each admitted session's video FPS (frames received over
its time watched). The processes are all stopped after each layout (Ctrl-C to rank 0, then a kill
past a deadline).
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from engine.config import ConfigError
from launch.benchmarks.serve_clients import _watch_all, peak_watching

START_S = 300.0
"""A layout's ranks must be serving within this long (loading the model on every rank)."""
STOP_S = 60.0


@dataclass(frozen=True)
class LayoutSpec:
    replicas: int
    group: int
    sp: bool

    @classmethod
    def parse(cls, text: str) -> LayoutSpec:
        match = re.fullmatch(r"(\d+)x(\d+)(sp)?", text)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ConfigError(f"layout {text!r}: write REPLICASxRANKS (e.g. 1x5, 5x1, 2x2, 1x2sp)")
        return cls(int(match[1]), int(match[2]), bool(match[3]))

    @property
    def world(self) -> int:
        return self.replicas * self.group

    def flags(self) -> list[str]:
        flags = ["--replicas", str(self.replicas)]
        if self.group > 1:
            flags += ["--sp", str(self.group)] if self.sp else ["--schedule", "cascade", "--offset", "1"]
        return flags

    def __str__(self) -> str:
        kind = f"sp {self.group}" if self.sp else f"cascade {self.group}"
        return f"{self.replicas} x ({kind})" if self.group > 1 else f"{self.replicas} x 1 rank"


def start_server(spec: LayoutSpec, preset: str, extra: list[str]) -> tuple[str, list[subprocess.Popen]]:
    """The layout's ranks; the viewers' WebSocket URL once rank 0 serves."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "launch.stream", "--preset", preset, "--port", "0", *spec.flags(), *extra]
    processes = []
    for rank in range(spec.world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec.world),
               "LOCAL_WORLD_SIZE": str(spec.world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))  # fmt: skip
    deadline, line = time.monotonic() + START_S, ""
    while "serving" not in line:
        line = processes[0].stdout.readline()
        if time.monotonic() > deadline or (not line and processes[0].poll() is not None):
            stop_server(processes)
            raise RuntimeError(f"layout {spec}: rank 0 never served (last line: {line.strip()!r})")
    return "ws://" + re.search(r"http://([\d.]+:\d+)", line).group(1) + "/ws", processes


def stop_server(processes: list[subprocess.Popen]) -> None:
    if processes[0].poll() is None:
        processes[0].send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def watch_layout(spec: LayoutSpec, trace: list, args, fps: float, end_s: float) -> tuple[list, float, int]:
    """Run a copy of the trace against the layout's server: (viewers, wall seconds, peak watching)."""
    url, processes = start_server(spec, args.preset, ["--timeout", "120", "--grace", "0.1"])
    try:
        viewers = copy.deepcopy(trace)
        wall = asyncio.run(_watch_all(url, viewers, args, fps, end_s))
    finally:
        stop_server(processes)
    return viewers, wall, peak_watching(viewers)


def session_fps(viewers: list) -> float:
    """Mean over admitted viewers of the frames each received per second it watched."""
    rates = [v.frames / v.watched_s for v in viewers if v.sid is not None and v.watched_s > 0]
    return float(np.mean(rates)) if rates else float("nan")
