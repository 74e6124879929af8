"""The CPU ranks benchmark pins each torchrun worker to its own core and reads the FPS generate prints.

pytest tests/launch/test_ranks_bench.py
"""

import shutil

import pytest

from launch.benchmarks.ranks import _command, _fps


def test_pinned_commands_give_each_rank_its_core():
    single = _command("demo", 4, [], 1, pinned=True)
    assert single[:3] == ["taskset", "-c", "0"] and "--threads" in single
    ranks = _command("demo", 4, ["--sp", "2"], 2, pinned=True)
    assert "--no-python" in ranks and "taskset -c $LOCAL_RANK" in ranks[-1] and "--sp 2" in ranks[-1]
    assert "taskset" not in " ".join(_command("demo", 4, [], 2, pinned=False))


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_pinned_two_rank_run_reports_its_fps():
    assert _fps(_command("tiny-wan", 2, ["--schedule", "cascade", "--sp", "2"], 2, pinned=True)) > 0
