"""The playout-slack scheduler, fidelity rungs, admission and the playout clock, without a model.

pytest tests/serving/test_scheduler.py
"""

from __future__ import annotations

import math

import pytest

from engine.serving.scheduler import (
    DEMO_LADDER,
    DEMO_STEPS,
    Limits,
    Playout,
    Rung,
    Standing,
    Throughput,
    admission,
    choose,
    next_rung,
)

MiB = 1 << 20


def limits(**kw) -> Limits:
    return Limits(kv_budget_bytes=64 * MiB, **kw)


def standing(sid: str, slack: float, waited: int = 0, started: bool = True, ticks: int = 3, served_at: int = 0):
    return Standing(sid, slack, waited, ticks, started, served_at)


def test_least_slack_first_and_sessions_ahead_wait():
    standings = [standing("a", 1.5), standing("b", 0.1), standing("c", 2.5), standing("d", 0.7), standing("e", 0.0)]
    chosen = [s.id for s in choose(standings, limits(batch=3, target_slack_s=2.0))]
    assert chosen == ["e", "b", "d"]
    assert "c" not in [s.id for s in choose(standings, limits(batch=5, target_slack_s=2.0))]  # above the target


def test_a_session_waiting_too_long_goes_first():
    standings = [standing("a", 0.0), standing("b", 0.1), standing("late", 1.9, waited=4)]
    chosen = [s.id for s in choose(standings, limits(batch=2, max_wait_rounds=4))]
    assert chosen == ["late", "a"]


def test_fifo_baseline_ignores_slack():
    standings = [standing("a", 0.0, served_at=9), standing("b", 1.5, served_at=3), standing("c", 0.5, served_at=5)]
    assert [s.id for s in choose(standings, limits(batch=2, order="fifo"))] == ["b", "c"]


def simulate(n: int, batch: int, rounds: int, gain: float, play: float, max_wait: int) -> dict[str, int]:
    """Sessions whose slack grows by `gain` when served and falls by `play` every round (overload
    when n * play > batch * gain); one session starts far ahead. Longest wait of each, in rounds."""
    lim = limits(batch=batch, max_wait_rounds=max_wait, target_slack_s=2.0)
    slack = {f"s{i}": 0.0 for i in range(n)}
    slack["s0"] = 1.9
    waited = dict.fromkeys(slack, 0)
    longest = dict.fromkeys(slack, 0)
    for _ in range(rounds):
        chosen = {s.id for s in choose([standing(k, v, waited[k]) for k, v in slack.items()], lim)}
        for k in slack:
            if k in chosen:
                slack[k] += gain
                waited[k] = 0
            elif slack[k] < lim.target_slack_s:
                waited[k] += 1
                longest[k] = max(longest[k], waited[k])
            slack[k] = max(slack[k] - play, 0.0)
    return longest


def test_no_session_starves_under_overload():
    n, batch, max_wait = 7, 2, 4
    longest = simulate(n, batch, rounds=400, gain=0.2, play=0.1, max_wait=max_wait)
    bound = max_wait + math.ceil(n / batch)
    assert max(longest.values()) <= bound, f"longest waits {longest} exceed {bound} rounds"
    assert longest["s0"] >= 1, "the session ahead waited for the others (slack order)"


def test_fidelity_drops_before_a_stall_and_stays_within_the_floor():
    lim = limits(batch=2, degrade_below_s=0.5, recover_above_s=1.0, ladder=DEMO_LADDER, floor_db=25.0)
    assert lim.rungs == (0.0, 2.0)  # 23.9 dB is below the floor
    short = standing("a", 0.6, ticks=3)  # 3 ticks of 0.05 s at half the rounds: 0.3 s to go
    slow = 0.6 / 16  # 0.6 frames per tick at 16 fps: 37.5 ms of video per tick, 100 ms per tick served
    assert next_rung(0, short, round_s=0.05, due=4, limits=lim, video_per_tick=slow) == 1
    assert next_rung(1, short, round_s=0.05, due=4, limits=lim, video_per_tick=slow) == 1  # top within the floor
    assert next_rung(1, standing("a", 3.0), round_s=0.05, due=4, limits=lim, video_per_tick=slow) == 0
    fast = 0.2  # keeps up: its slack grows, no need to lower fidelity ...
    assert next_rung(0, short, round_s=0.05, due=4, limits=lim, video_per_tick=fast) == 0
    late = standing("a", 0.2, ticks=3)  # ... unless its next block would come late even so
    assert next_rung(0, late, round_s=0.05, due=4, limits=lim, video_per_tick=fast) == 1
    unstarted = standing("a", 0.0, started=False)
    assert next_rung(0, unstarted, round_s=0.05, due=4, limits=lim, video_per_tick=slow) == 0
    assert next_rung(0, short, round_s=None, due=4, limits=lim, video_per_tick=slow) == 0  # nothing measured yet
    assert limits(degrade=False, ladder=DEMO_LADDER).rungs == (0.0,)
    assert limits(floor_db=20.0, ladder=DEMO_LADDER).rungs == (0.0, 2.0, 4.0)
    assert limits(floor_db=20.0).rungs == (0.0,)  # no ladder given: the manager fills in the preset's


def test_throughput_model_and_capacity():
    meter = Throughput(smoothing=1.0)
    assert meter.estimate(1) is None and meter.sessions(16, 0.6, limits(), most=8) is None
    meter.record(1, 0.020)
    assert meter.estimate(3) == pytest.approx(0.060)  # one size: proportional
    meter.record(2, 0.025)
    assert meter.estimate(4) == pytest.approx(0.035)  # 15 ms per round + 5 ms per session
    # n sessions keep 16 fps while n * 16 <= 0.9 * min(n, 4) * 0.6 / round_s(min(n, 4))
    assert meter.sessions(16, 0.6, limits(batch=4, headroom=0.9), most=10) == 3
    floor = limits(batch=4, headroom=0.9, ladder=DEMO_LADDER, floor_db=25.0, admit_at_floor=True)
    assert floor.floor_speedup(4) == pytest.approx(5 / 4)  # a quarter of 4 steps skipped; the commit stays
    assert meter.sessions(16, 0.6, floor, most=10, speedup=floor.floor_speedup(4)) == 4


def test_admission_refuses_beyond_the_kv_budget_or_the_throughput():
    lim = limits()
    full = admission(running=2, kv_in_use=60 * MiB, kv_per_session=8 * MiB, capacity=None, limits=lim)
    assert not full.admit and "KV memory is full (8 sessions" in full.reason
    slow = admission(running=3, kv_in_use=8 * MiB, kv_per_session=8 * MiB, capacity=3, limits=lim)
    assert not slow.admit and "keeps 3 sessions" in slow.reason
    assert admission(running=0, kv_in_use=0, kv_per_session=8 * MiB, capacity=0, limits=lim).admit  # one always runs
    one = admission(running=1, kv_in_use=8 * MiB, kv_per_session=8 * MiB, capacity=1, limits=lim)
    assert "the engine keeps 1 session at full frame rate" in one.reason  # not "1 sessions"
    off = Limits(kv_budget_bytes=64 * MiB, throughput_admission=False)
    assert admission(running=9, kv_in_use=8 * MiB, kv_per_session=8 * MiB, capacity=3, limits=off).admit


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="order"):
        limits(order="lifo")
    with pytest.raises(ValueError, match="exact rung"):
        limits(ladder=((1.0, 30.0, 0.1),))
    with pytest.raises(ValueError, match="batch"):
        limits(batch=0)


def test_playout_clock_counts_stalls_and_holds():
    clock = Playout(fps=10)
    clock.add(5, now=0.0)  # 0.5 s of video at t = 0
    assert clock.slack(0.2) == pytest.approx(0.3)
    assert clock.slack(0.8) == 0.0 and clock.stalls == 1 and clock.stall_s == pytest.approx(0.3)
    clock.add(10, now=1.0)  # the stall lasted 0.5 s in all; playout goes on from here
    assert clock.stall_s == pytest.approx(0.5) and clock.slack(1.0) == pytest.approx(1.0)
    clock.hold("paused", now=1.5)
    assert clock.slack(9.0) == pytest.approx(0.5)  # paused: nothing played, no stall
    clock.release("paused", now=9.0)
    assert clock.slack(9.5) == pytest.approx(0.0) and clock.stalls == 1
    clock.report(0.2, now=9.5)  # the viewer says it is behind the model's guess
    assert clock.slack(9.5) == pytest.approx(1.3)


def test_serve_bench_trace_and_summary():
    from argparse import Namespace
    from collections import Counter

    import numpy as np

    from launch.benchmarks.serve import Viewer, make_trace, summarize

    args = Namespace(seconds=300.0, watch_s=5.0, switch_s=2.0)
    trace = make_trace(2.0, args, np.random.default_rng(0))  # 0.4 arrivals a second: 120
    arrivals = [v.arrival for v in trace]
    assert arrivals == sorted(arrivals) and len(trace) == 120 and arrivals[-1] < 300
    assert all(2.5 <= v.watch_s <= 7.5 and all(s < v.watch_s for s in v.switches) for v in trace)
    played = [Viewer(0.0, 10.0, 1, ["p"], [], sid="a", admitted_at=0.5, first_frame_at=1.0, watched_s=10.0,
                     stats={"stall_s": 1.0}),
              Viewer(2.0, 10.0, 2, ["p"], [], sid="b", admitted_at=2.0, first_frame_at=2.5, watched_s=20.0,
                     stats={"stall_s": 2.0}),
              Viewer(3.0, 10.0, 3, ["p"], [], gave_up=True)]  # fmt: skip
    mgr = Namespace(batches=Counter({1: 2, 3: 2}))
    row = summarize(1.0, 1.5, "engine", played, wall=30.0, mgr=mgr)
    assert (row["admitted"], row["refused"]) == (2, 1)
    assert row["cpr"] == pytest.approx(0.9) and row["stall_s_per_min"] == pytest.approx(6.0)
    assert row["ttff_p50_s"] == pytest.approx(0.75) and row["batch_mean"] == pytest.approx(2.0)


def test_step_rungs_cost_their_forwards_and_set_the_floor_speedup():
    assert DEMO_STEPS[2] == Rung(0.0, 23.6, 0.0, steps=2) and DEMO_STEPS[2].forwards(4) == 3  # 2 steps + the commit
    assert Rung(2.0, 28.2, 0.25).forwards(4) == 4  # a quarter of 4 steps skipped
    assert limits(ladder=DEMO_STEPS).floor_speedup(4) == pytest.approx(5 / 3)  # default floor: down to 2 steps
    assert limits(ladder=DEMO_STEPS, floor_db=25.0).floor_speedup(4) == pytest.approx(5 / 4)
    assert limits(ladder=DEMO_STEPS, degrade=False).floor_speedup(4) == 1.0
    meter = Throughput(round_s={1: 0.03, 2: 0.045})
    # each of n sessions gets 0.9 * speedup * min(n, batch) * frames_per_tick / round_s(n) / n fps
    assert meter.per_session_fps(2, 0.6, limits(), 5 / 3) == pytest.approx(20.0)
    assert meter.per_session_fps(3, 0.6, limits(), 5 / 3) == pytest.approx(15.0)
    assert meter.sessions(16, 0.6, limits(), most=8, speedup=5 / 3) == 2
    full = admission(running=1, kv_in_use=0, kv_per_session=MiB, capacity=1, limits=limits(admit_at_floor=False))
    assert not full.admit and full.memory and "at full fidelity" in full.reason
