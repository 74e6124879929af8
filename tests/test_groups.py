"""Sessions on a rank group (gloo on CPU): each session served by a cascade or sp group equals the
same session run alone on one device, with joins at different rounds, a prompt switch, and a
suspend/resume that changes nothing (bit-exact against the same script without it).

    pytest tests/test_groups.py

Each case is one `torchrun --standalone` launch of tests/group_worker.py under an outer timeout;
the group's leader saves every session's latents, compared here with `Session.run` on one process
(the cascade plan runs there as the pyramid it is).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from group_worker import group_preset

from engine.loading import WeightPaths
from helpers import assert_close
from launch.build import build_session

WORKER = Path(__file__).with_name("group_worker.py")


def _launch(ranks: int, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(WORKER), "--out", str(out), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _solo(preset, seed: int, prompts: list, blocks: int) -> torch.Tensor:
    """One device, the session's seed and prompt log (tick -> prompt from then on)."""
    session = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32)

    def prompt(tick):
        return [text for start, text in prompts if start <= tick.index][-1]

    with torch.no_grad():
        return torch.cat([b.latents for b in session.run(prompt, blocks=blocks, seed=seed)], dim=2)


def _check(out: Path, preset, what: str, group: int = 0) -> None:
    plain = torch.load(out / f"plain-group{group}.pt")
    suspended = torch.load(out / f"suspended-group{group}.pt")
    assert set(plain) == {"a", "b", "c"}, f"{what}: sessions {sorted(plain)}"
    assert any(len(p["prompts"]) > 1 for p in plain.values()), f"{what}: the switch did not happen"
    for name, got in plain.items():
        frames = got["latents"].shape[2] // preset.stream.frames_per_block
        assert frames >= 2, f"{what}: session {name} finished {frames} blocks"
        want = _solo(preset, got["seed"], got["prompts"], frames)
        assert_close(got["latents"], want, 1e-5, f"{what}: session {name} vs alone on one device")
    # suspending b on every rank and resuming it changes nothing; a and c run as in the plain script
    for name, got in suspended.items():
        blocks = min(got["latents"].shape[2], plain[name]["latents"].shape[2])
        assert blocks > 0 and torch.equal(got["latents"][:, :, :blocks], plain[name]["latents"][:, :, :blocks]), (
            f"{what}: session {name} with b suspended and resumed differs from the plain run"
        )


@pytest.mark.parametrize("plan", ["cascade:joint:1", "cascade:lagged:1"])
def test_sessions_on_a_two_rank_cascade_equal_one_device(tmp_path, plan):
    result = _launch(2, tmp_path, "--plan", plan)
    assert result.returncode == 0, result.stderr[-3000:]
    _check(tmp_path, group_preset("tiny-wan", plan), f"2-rank cascade, {plan}")


def test_sessions_on_a_cascade_2_by_sp_2_equal_one_device(tmp_path):
    plan = "cascade:joint:1"
    result = _launch(4, tmp_path, "--plan", plan, "--sp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _check(tmp_path, group_preset("tiny-wan", plan), "cascade 2 x sp 2")


def test_sessions_on_sp_2_with_the_sequential_plan_equal_one_device(tmp_path):
    plan = "sequential:joint:1"
    result = _launch(2, tmp_path, "--plan", plan, "--sp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _check(tmp_path, group_preset("tiny-wan", plan), "sp 2, sequential")


def test_two_groups_each_serve_their_own_sessions(tmp_path):
    """4 ranks as 2 groups of a 2-rank cascade: each group's leader runs its script alone."""
    plan = "cascade:joint:1"
    result = _launch(4, tmp_path, "--plan", plan, "--replicas", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for group in (0, 1):
        _check(tmp_path, group_preset("tiny-wan", plan), f"group {group} of 2", group)
