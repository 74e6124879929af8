"""Sessions on a rank group (gloo on CPU): each session served by a cascade or sp group equals the
same session run alone on one device, with joins at different rounds, a prompt switch, and a
suspend/resume that changes nothing (bit-exact against the same script without it).

    pytest tests/parallel/test_groups.py

Each case is one `torchrun --standalone` launch of tests/support/group_worker.py under an outer timeout;
the group's leader saves every session's latents, compared here with `Session.run` on one process
(the cascade plan runs there as the pyramid it is).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from group_worker import group_preset

from engine.config import ConfigError
from engine.serving.group import Outbox, follow
from engine.serving.scheduler import Limits
from engine.serving.sessions import SessionManager
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.cli import parallel_from_args, preset_from_args
from launch.layouts import choose_layout, rank_layouts
from launch.presets import get_preset
from launch.stream import check_group, check_mode, parse_args
from parallel.topology import ParallelConfig, Topology, TopologyError

WORKER = Path(__file__).parents[1] / "support" / "group_worker.py"


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


@pytest.mark.parametrize("plan, replicas", [("cascade:joint:1", 2), ("cascade:lagged:1", 1)])
def test_sessions_on_a_two_rank_cascade_equal_one_device(tmp_path, plan, replicas):
    """Joint context on 4 ranks as 2 groups of a 2-rank cascade (each group's leader runs its script
    alone, and both are checked); lagged context on one group of 2."""
    result = _launch(2 * replicas, tmp_path, "--plan", plan, "--replicas", str(replicas))
    assert result.returncode == 0, result.stderr[-3000:]
    for group in range(replicas):
        _check(tmp_path, group_preset("tiny-wan", plan), f"2-rank cascade, {plan}, group {group}", group)


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


def test_the_layout_model_keeps_the_most_sessions_else_the_fastest():
    """Modelled (launch/layouts.py): every layout the launcher runs is ranked; where some layout
    keeps a session at full frame rate the first keeps the most, else the first is the fastest."""
    for preset, gpus in (("self-forcing-1.3b", 5), ("self-forcing-1.3b", 4), ("wan-14b-causal", 5)):
        ranked = rank_layouts(preset, gpus)
        assert ranked and all(layout.replicas * layout.split.gpus == gpus for layout, _ in ranked)
        best = ranked[0][1]
        if any(t.sessions for _, t in ranked):
            assert best.sessions == max(t.sessions for _, t in ranked), ranked
        else:
            assert best.session_fps == max(t.session_fps for _, t in ranked), ranked
    assert {layout.split.cascade for layout, _ in rank_layouts("self-forcing-1.3b", 4, cascade=False)} == {1}


def test_parallel_auto_picks_a_sessions_layout_and_says_why(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    args = parse_args(["--preset", "self-forcing-1.3b", "--random-weights", "--parallel", "auto", "--schedule",
                       "cascade", "--offset", "1"])  # fmt: skip
    cfg = parallel_from_args(args, preset_from_args(args))
    choice = choose_layout("self-forcing-1.3b", 4, "nvlink", cascade=True, offset=1)
    assert (cfg.replicas, cfg.sp) == (choice.layout.replicas, choice.layout.split.sp)
    said = capsys.readouterr().err
    assert "--parallel auto: 4 GPUs on NVLink for sessions" in said and "modelled" in said, said
    with pytest.raises(ConfigError, match="chooses --replicas itself"):
        parallel_from_args(parse_args(["--parallel", "auto", "--replicas", "2"]))


def test_flags_of_groups_are_refused_where_they_mean_nothing():
    four = Topology(ParallelConfig(replicas=2), 0, 4, 0, None)
    assert (four.group_size, four.cascade_size, four.leader, four.group_ranks) == (2, 2, 0, [0, 1])
    three = Topology(ParallelConfig(replicas=2), 3, 4, 3, None)
    assert (three.group, three.local, three.leader, three.sink, three.cascade_rank) == (1, 1, 2, 2, 1)
    with pytest.raises(TopologyError, match="--replicas 3 must divide the 4 processes"):
        Topology(ParallelConfig(replicas=3), 0, 4, 0, None)
    with pytest.raises(ConfigError, match="add --schedule cascade, or --sp 2"):
        check_group(four, "sequential")
    with pytest.raises(ConfigError, match="drop --decode-rank"):
        check_mode(parse_args(["--decode-rank"]), Topology(ParallelConfig(decode_rank=True), 0, 3, 0, None))
    with pytest.raises(ConfigError, match="drop --replicas, or drop --shared-stream"):
        check_mode(parse_args(["--shared-stream", "--replicas", "2"]), four)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Cast:
    """A group broadcast inside one process: the leader's packets, replayed to a follower."""

    def __init__(self):
        self.packets = []

    def send(self, packet):
        self.packets.append(packet.copy())

    def recv(self):
        return self.packets.pop(0)


class _Recording(SessionManager):
    """A follower's manager that keeps what its ranks' steps finish (on one process: every block)."""

    def step_streams(self, streams):
        out = super().step_streams(streams)
        for stream, blocks in zip(streams, out):
            self.finished.setdefault(id(stream), []).extend(b.latents for b in blocks)
        return out


def test_a_follower_replays_the_leaders_rounds_with_their_fidelity_and_steps(monkeypatch):
    """The round packet carries everything a rank needs: a follower fed the leader's packets steps
    the same sessions at the same rungs (the demo's step ladder, forced round by round) and its
    blocks equal the leader's bit for bit; joins, a switch, a suspend and a close included."""
    rungs = iter([0, 1, 1, 2, 2, 0, 1, 2, 3] * 20)
    monkeypatch.setattr("engine.serving.sessions.next_rung", lambda *args: next(rungs))
    session = build_session(get_preset("demo"), WeightPaths(), torch.device("cpu"), torch.float32)
    cast, clock = _Cast(), _Clock()
    limits = Limits(kv_budget_bytes=64 << 20, grace_s=0.0, floor_db=20.0, throughput_admission=False)
    leader = SessionManager(session, limits, clock, outbox=Outbox(cast))
    assert any(level.steps for level in leader.limits.levels), leader.limits.levels
    follower = _Recording(session, limits, clock)
    follower.finished = {}
    led = {}
    for index in range(14):
        if index in (0, 2):
            led[
                leader.open("a red circle moving left" if index == 0 else "a blue square moving up", seed=index).id
            ] = []
        if index == 5:
            leader.set_prompt(next(iter(led)), "a green triangle moving right")
        if index == 8:
            leader.viewer_left(list(led)[1])
        if index == 11:
            leader.viewer_returned(list(led)[1])
        for sid, chunks in leader.round_blocks().items():
            led[sid].extend(chunk.latents for chunk in chunks)
        clock.t += 0.05
    leader.close(list(led)[0])
    leader.stop_group()
    assert follow(follower, cast) == "stopped" and not cast.packets
    got = sorted(follower.finished.values(), key=len)
    want = sorted(led.values(), key=len)
    assert [len(g) for g in got] == [len(w) for w in want] and all(len(w) >= 2 for w in want), (got, want)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w)), "a follower's blocks differ from its leader's"
