"""Two machines, simulated on loopback: two torchrun launchers meet through c10d rendezvous.

    pytest tests/parallel/test_multinode.py

Each launcher is one "node" with 2 processes; the job is a cascade of 2 stages (one per node)
with 2 Ulysses ranks inside each, so the per-layer all-to-alls stay inside a node and only the
cascade's K/V exchange crosses between nodes. The result equals one device.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from cascade_worker import run_preset

from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session

WORKER = Path(__file__).parents[1] / "support" / "cascade_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(endpoint: str, out: Path, runs: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=arcade-test", "--max_restarts=0",
               str(WORKER), "--out", str(out), "--blocks", "4", "--sp", "2", "--runs", *runs]  # fmt: skip
    # own session: the whole node (launcher and workers) can be killed if it outlives the test
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_cascade_across_two_nodes_with_sp_inside_each(tmp_path):
    runs = ["joint:causal:1", "lagged:causal:1"]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_node(endpoint, tmp_path, runs) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    for run in runs:
        session = build_session(run_preset("tiny-wan", run), WeightPaths(seed=3), torch.device("cpu"), torch.float32)
        with torch.no_grad():
            prompt = lambda tick: "a red circle moving left" if tick.index < 6 else "a blue square moving up"  # noqa: E731
            expected = torch.cat([b.latents for b in session.run(prompt, blocks=4, seed=0)], dim=2)
        actual = torch.load(tmp_path / f"{run.replace(':', '-')}.pt")
        assert_close(actual, expected, 1e-5, f"2 nodes x (sp 2), {run}")
