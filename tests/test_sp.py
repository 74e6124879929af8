"""Ulysses sequence parallelism: sp ranks sharing every forward equal one device.

pytest tests/test_sp.py

Each case launches tests/sp_worker.py under torchrun (gloo, loopback) with an outer timeout; rank 0
saves the latents, compared here with the same preset on one process (<= 1e-5 at float32).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sp_worker import run_preset

from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from parallel.ulysses import yunchang_available

WORKER = Path(__file__).with_name("sp_worker.py")
BLOCKS = 5


def _launch(ranks: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(WORKER), "--out", str(out), "--blocks", str(BLOCKS), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _one_device(preset_name: str, run: str) -> tuple[torch.Tensor, int]:
    session = build_session(run_preset(preset_name, run), WeightPaths(seed=3), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        latents = torch.cat([b.latents for b in session.run("a red circle", blocks=BLOCKS, seed=0)], dim=2)
    return latents, session.executors(NoiseSource(0), blocks_in_forward=1).cache.nbytes


BACKENDS = ["torch"] + (["yunchang"] if yunchang_available() else [])


@pytest.mark.parametrize(
    "preset, runs",
    [
        ("tiny-wan", [f"pyramid:1:{b}" for b in BACKENDS] + ["sequential:0:torch", "pyramid:1:torch:flowcache:0.5"]),
        ("magi-sp", ["pyramid:2:torch"]),  # GQA: sp 2 divides its 2 kv heads
    ],
)
def test_sp_2_equals_one_device(tmp_path, preset, runs):
    result = _launch(2, tmp_path, "--preset", preset, "--runs", *runs)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in runs:
        saved = torch.load(tmp_path / f"{run.replace(':', '-')}.pt")
        expected, kv_bytes = _one_device(preset, run)
        assert_close(saved["latents"], expected, 1e-5, f"sp 2 vs one device, {preset} {run}")
        assert saved["kv_bytes"] * 2 == kv_bytes, "each sp rank keeps half the heads' K/V"


def test_splits_the_layout_cannot_make_are_refused():
    from engine.runtime.sharding import Ulysses

    class Three:
        size, rank = 3, 0

    with pytest.raises(ValueError, match="token rows"):
        Ulysses(Three(), 2).check(height=8, heads=6, kv_heads=3)  # 4 token rows
    with pytest.raises(ValueError, match="heads"):
        Ulysses(Three(), 2).check(height=12, heads=4, kv_heads=2)
