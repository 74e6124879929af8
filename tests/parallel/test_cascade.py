"""Block Cascading over torchrun ranks (gloo on CPU): equal to one device, lagged context, faults.

    pytest tests/parallel/test_cascade.py

Each multi-rank case is one `torchrun --standalone` launch of tests/support/cascade_worker.py under an
outer timeout; the sink rank saves latents, compared here with the one-device executor.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cascade_worker import run_preset

from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.presets import get_preset
from parallel.topology import ParallelConfig, Topology, TopologyError, _layout

WORKER = Path(__file__).parents[1] / "support" / "cascade_worker.py"
BLOCKS = 5
STEPS = get_preset("tiny-wan").sampling.steps


def _launch(ranks: int, out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(WORKER), "--out", str(out), "--blocks", str(BLOCKS), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _prompt(tick):
    return "a red circle moving left" if tick.index < 6 else "a blue square moving up"  # as the worker


def _one_device(run: str, preset: str = "tiny-wan") -> torch.Tensor:
    pipeline = build_session(run_preset(preset, run), WeightPaths(seed=3), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return torch.cat([b.latents for b in pipeline.run(_prompt, blocks=BLOCKS, seed=0)], dim=2)


def _sequential() -> torch.Tensor:
    pipeline = build_session(get_preset("tiny-wan"), WeightPaths(seed=3), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return torch.cat([b.latents for b in pipeline.run(_prompt, blocks=BLOCKS, seed=0)], dim=2)


@pytest.mark.parametrize(
    "ranks, runs",
    [
        (2, ["joint:causal:1", "lagged:bidirectional:1", f"joint:causal:{STEPS + 1}", "lagged:causal:1:flowcache:0.5"]),
        (3, ["joint:bidirectional:1", "joint:causal:2", "lagged:causal:1", "joint:causal:1:flowcache:0.5"]),
        (5, ["joint:causal:1", "joint:bidirectional:1", "joint:causal:1:scope:0.3"]),
    ],
)
def test_cascade_equals_one_device(tmp_path, ranks, runs):
    """joint over N ranks equals one forward per tick on one device (the reference semantics);
    lagged equals the one-device lagged reference; offset steps+1 equals sequential generation;
    with feature caching each rank decides for its own blocks and still equals one device."""
    result = _launch(ranks, tmp_path, "--runs", *runs)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in runs:
        offset = run.split(":")[2]
        actual = torch.load(tmp_path / f"{run.replace(':', '-')}.pt")
        assert_close(actual, _one_device(run), 1e-5, f"{ranks} ranks, {run}")
        if int(offset) == STEPS + 1:
            assert_close(actual, _sequential(), 1e-5, f"{ranks} ranks, offset {offset} vs sequential")


def test_cascade_2_by_sp_2_equals_one_device(tmp_path):
    """4 ranks as a cascade of 2 stages with 2 Ulysses ranks each (sp groups inside a stage, K/V
    exchanged between stages per head group): joint, lagged and with feature caching, one device."""
    runs = ["joint:causal:1", "lagged:causal:1", "joint:causal:1:flowcache:0.5"]
    result = _launch(4, tmp_path, "--sp", "2", "--runs", *runs)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in runs:
        actual = torch.load(tmp_path / f"{run.replace(':', '-')}.pt")
        assert_close(actual, _one_device(run), 1e-5, f"cascade 2 x sp 2, {run}")


def test_magi_cascade_equals_one_device(tmp_path):
    """MAGI-1 (tiny): its chunk window over 3 ranks, three-pass guidance, per-stage KV ranges, and
    with FlowCache, equals one device; so does lagged context (with and without FlowCache)."""
    runs = ["joint:causal:2", "joint:causal:2:flowcache:0.3", "lagged:causal:2", "lagged:causal:2:flowcache:0.3"]
    result = _launch(3, tmp_path, "--preset", "magi-1-tiny", "--runs", *runs)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in runs:
        actual = torch.load(tmp_path / f"{run.replace(':', '-')}.pt")
        assert_close(actual, _one_device(run, "magi-1-tiny"), 1e-5, f"MAGI-1, 3 ranks, {run}")


@pytest.mark.parametrize("kind, cause", [("raise", "rank 1: RuntimeError: injected"), ("exit", "rank 1 (pid"),
                                         ("hang", "rank 1 stopped responding in tick 3")])  # fmt: skip
def test_a_failing_rank_stops_every_rank_with_its_name(tmp_path, kind, cause):
    # No wall-clock bound: under load three processes take minutes to start. Without the watchdog
    # the ranks would wait out gloo's 30-minute default and `_launch` would time out instead.
    result = _launch(3, tmp_path, "--blocks", "8", "--timeout", "8", "--fault", f"1:3:{kind}", timeout=300)
    assert result.returncode != 0
    messages = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert messages and all(cause in m for m in messages), "\n".join(messages) or result.stderr[-2000:]
    leftover = subprocess.run(["pgrep", "-f", str(WORKER)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left behind: {leftover}"


CASCADE_2 = ["--schedule", "cascade", "--offset", "2", "--sp", "2"]


@pytest.mark.parametrize("ranks, plan", [(3, ["--sp", "2"]), (5, CASCADE_2)])
def test_generate_under_torchrun_with_a_decode_rank(tmp_path, ranks, plan):
    """The decode rank receives every block from the stage that made it (with sp, its first rank):
    of a cascade, or of the preset's own sequential plan on one sp group."""
    out = tmp_path / "cascade.mp4"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
               "engine.generate", "--preset", "tiny-wan", "--decode-rank", "--blocks", "4", *plan,
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from engine.serving.video import read_frames

    assert read_frames(out).shape[0] == get_preset("tiny-wan").pixel_frames(4)
    assert result.stdout.count("wrote") == 1, "only the decode rank writes"
    said = "cascade 2 x sp 2" if "cascade" in plan else "sp 2 share every forward of the sequential plan"
    assert f"{said}, all-to-all: " in result.stderr, "sp is reported at start-up"


def test_layouts_that_do_not_fit_fail_clearly():
    assert _layout(4, ParallelConfig()) == (4, 4)
    assert _layout(4, ParallelConfig(decode_rank=True)) == (3, 3)
    assert _layout(4, ParallelConfig(sp=2)) == (2, 4)  # cascade 2 x sp 2
    assert _layout(5, ParallelConfig(sp=2, decode_rank=True)) == (2, 4)
    with pytest.raises(TopologyError, match="must divide"):
        _layout(4, ParallelConfig(sp=3))
    with pytest.raises(TopologyError, match="torchrun started 4"):
        _layout(4, ParallelConfig(cascade=3))
    with pytest.raises(TopologyError, match="at least 2"):
        _layout(1, ParallelConfig(decode_rank=True))
    topology = Topology(ParallelConfig(), 0, 5, 0, None)
    with pytest.raises(TopologyError, match="at most 3 blocks in flight"):
        topology.check_plan(3, 4, 2)
    assert [topology.owner(b) for b in range(7)] == [0, 1, 2, 3, 4, 0, 1]
    assert not Topology.single().distributed and Topology.single().is_decoder
    from launch.presets import get_preset
    from launch.run import check_ranks

    skyreels = get_preset("skyreels-v2-df-tiny")  # reruns its window by default: no KV cache to hand on
    cascade = dataclasses.replace(skyreels, plan=dataclasses.replace(skyreels.plan, schedule="cascade", offset=2))
    with pytest.raises(TopologyError, match="add --compute selective"):
        check_ranks(cascade, Topology(ParallelConfig(), 0, 2, 0, None))


def test_parallel_auto_picks_a_split_and_says_why(tmp_path):
    out = tmp_path / "auto.mp4"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m",
               "engine.generate", "--preset", "tiny-wan", "--schedule", "cascade", "--offset", "1",
               "--parallel", "auto", "--blocks", "3", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = [line for line in result.stderr.splitlines() if line.startswith("--parallel auto: 3 GPUs on NVLink")]
    assert len(reasons) == 1, result.stderr[-2000:]  # said once, with the modelled comparison
    assert "FPS modelled" in reasons[0] and out.exists()
