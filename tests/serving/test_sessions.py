"""The session manager on the demo model with a fake clock: distinct streams, joins, admission,
the KV budget, fidelity under load, suspension, expiry and independence of sessions.

pytest tests/serving/test_sessions.py
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch

from engine.serving.scheduler import DEMO_LADDER, DEMO_STEPS, Limits
from engine.serving.sessions import Opened, Refused, SessionError, SessionManager
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.presets import get_preset

RED, BLUE = "a red circle moving left", "a blue square moving up"


class FakeClock:
    """Time that moves only when told to, plus `per_read` seconds at every read (a round reads it
    at its start and end: that is how long the round seems to take)."""

    def __init__(self, per_read: float = 0.0):
        self.t, self.per_read = 0.0, per_read

    def __call__(self) -> float:
        self.t += self.per_read
        return self.t


@pytest.fixture(scope="module")
def session():
    torch.set_grad_enabled(False)
    return build_session(get_preset("demo"), WeightPaths(), torch.device("cpu"), torch.float32)


def manager(session, clock=None, **limits) -> SessionManager:
    limits.setdefault("kv_budget_bytes", 64 << 20)
    limits.setdefault("degrade", False)
    return SessionManager(session, Limits(**limits), clock or FakeClock())


def collect(mgr: SessionManager, rounds: int, into: dict | None = None) -> dict[str, list[np.ndarray]]:
    into = {} if into is None else into
    for _ in range(rounds):
        for sid, blocks in mgr.round().items():
            into.setdefault(sid, []).extend(blocks)
    return into


def solo(session, prompt, blocks: int, seed: int) -> list[np.ndarray]:
    return [frames for _, frames in session.run(prompt, blocks=blocks, seed=seed).frames()]


def assert_frames_equal(got: list[np.ndarray], want: list[np.ndarray], what: str, tol: int = 1) -> None:
    """Pixels of coalesced runs may differ from a solo run by float rounding (<= 1e-5 in latents),
    which can move a uint8 level by one; anything more is a different stream."""
    assert len(got) >= len(want), f"{what}: {len(got)} blocks, expected {len(want)}"
    diff = np.abs(np.stack(got[: len(want)]).astype(int) - np.stack(want).astype(int))
    assert diff.max() <= tol, f"{what}: max pixel diff {diff.max()} (mean {diff.mean():.4f})"


def test_sessions_get_their_own_streams_and_joiners_share_them(session):
    mgr = manager(session)
    a, b = mgr.open(RED, seed=1), mgr.open(RED, seed=2)
    assert isinstance(a, Opened) and isinstance(b, Opened) and a.id != b.id
    joined = mgr.join(a.id)
    assert joined == Opened(a.id, joined=True) and mgr.stats(a.id)["viewers"] == 2
    frames = collect(mgr, 16)  # 5 ticks per block: 3 blocks each
    assert_frames_equal(frames[a.id], solo(session, RED, 3, seed=1), "session a vs its solo run")
    assert_frames_equal(frames[b.id], solo(session, RED, 3, seed=2), "session b vs its solo run")
    assert not np.array_equal(frames[a.id][0], frames[b.id][0]), "different seeds gave the same video"
    mgr.viewer_left(a.id)  # one of its two viewers leaves: it keeps running
    assert mgr.stats(a.id)["state"] == "running"
    with pytest.raises(SessionError, match="open a new one"):
        mgr.join("nope")


def test_admission_refuses_beyond_the_kv_budget_with_a_queue(session):
    probe = manager(session)
    per = probe.kv_per_session
    mgr = manager(session, kv_budget_bytes=int(2.5 * per), queue=2, retry_s=1.5)
    first, second = mgr.open(RED, 0), mgr.open(RED, 1)
    third = mgr.open(RED, 2)
    assert isinstance(third, Refused) and third.queue_position == 1 and third.retry_after_s == 1.5
    assert "KV memory is full (2 sessions" in third.reason and "\n" not in third.reason
    fourth = mgr.open(RED, 3)
    assert fourth.queue_position == 2 and fourth.retry_after_s == 3.0
    fifth = mgr.open(RED, 4)
    assert fifth.queue_position is None and fifth.ticket is None and "queue is full" in fifth.reason
    assert mgr.server_stats()["kv_bytes"] <= mgr.limits.kv_budget_bytes
    mgr.close(first.id)
    assert isinstance(mgr.open(RED, 5), Refused), "a newcomer jumped the queue"
    assert mgr.open(RED, 3, ticket=fourth.ticket).queue_position == 2, "second in the queue went first"
    admitted = mgr.open(RED, 2, ticket=third.ticket)
    assert isinstance(admitted, Opened) and second.id in mgr.sessions
    assert mgr.server_stats()["kv_bytes"] == 2 * per <= mgr.limits.kv_budget_bytes


def test_kv_bytes_never_exceed_the_budget(session):
    clock = FakeClock()
    mgr = manager(session, clock, kv_budget_bytes=int(3.5 * manager(session).kv_per_session), grace_s=1.0,
                  expire_s=2.0)  # fmt: skip
    rng = np.random.default_rng(0)
    for step in range(60):
        action, ids = rng.integers(4), list(mgr.sessions)
        if action == 0 or not ids:
            mgr.open(RED, seed=step)
        elif action == 1:
            mgr.viewer_left(ids[rng.integers(len(ids))])
        elif action == 2:
            sid = ids[rng.integers(len(ids))]
            if mgr.sessions[sid].state != "running":
                mgr.viewer_returned(sid)
        clock.t += 0.5
        mgr.round()
        device = sum(s.executor.cache.nbytes for s in mgr.sessions.values() if s.state != "suspended")
        assert device == mgr.kv_bytes <= mgr.limits.kv_budget_bytes, f"step {step}: {device} bytes on the device"


def test_fidelity_drops_before_any_stall_and_within_the_floor(session):
    clock = FakeClock(per_read=0.04)  # every round seems to take 80 ms: 7.5 fps per session, 16 wanted
    mgr = manager(session, clock, degrade=True, batch=2, ladder=DEMO_LADDER, floor_db=25.0)
    ids = [mgr.open(RED, seed=i).id for i in range(2)]
    first_degraded = first_stall = None
    thresholds = set()
    for r in range(40):
        for chunks in mgr.round_blocks().values():
            thresholds.update(c.threshold for c in chunks)
        live = [mgr.sessions[sid] for sid in ids]  # (stats() would read the clock)
        if first_degraded is None and any(s.rung > 0 for s in live):
            first_degraded = r
        if first_stall is None and any(s.playout.stalls > 0 for s in live):
            first_stall = r
    assert first_degraded is not None and first_stall is not None, (first_degraded, first_stall)
    assert first_degraded < first_stall, f"first degraded round {first_degraded}, first stall {first_stall}"
    assert thresholds <= {0.0, 2.0} and 2.0 in thresholds, f"thresholds used {thresholds} (floor allows 0, 2)"
    assert all(mgr.stats(sid)["cache_hits"] > 0 for sid in ids)


def test_no_session_starves(session):
    clock = FakeClock(per_read=0.05)  # overload: 5 sessions, 2 per round
    mgr = manager(session, clock, batch=2, max_wait_rounds=3)
    ids = [mgr.open(RED, seed=i).id for i in range(5)]
    collect(mgr, 40)
    waits = [mgr.stats(sid)["most_waited_rounds"] for sid in ids]
    assert max(waits) <= 3 + 3, f"longest waits {waits}"
    assert all(mgr.stats(sid)["frames"] > 0 for sid in ids)


def test_suspended_session_resumes_bit_exactly_and_expired_ones_are_freed(session):
    clock = FakeClock()
    # one session per forward: each computes exactly as alone (a coalesced call may round differently)
    mgr = manager(session, clock, batch=1, grace_s=5.0, expire_s=30.0)
    paused, steady = mgr.open(RED, seed=7).id, mgr.open(RED, seed=7).id
    frames = collect(mgr, 14)  # 7 ticks each: mid-block
    mgr.viewer_left(paused)
    collect(mgr, 3, frames)
    clock.t += 6.0
    collect(mgr, 1, frames)
    assert mgr.stats(paused)["state"] == "suspended"
    assert mgr.server_stats()["kv_bytes"] == mgr.kv_per_session
    assert isinstance(mgr.viewer_returned(paused), Opened)
    collect(mgr, 24, frames)
    assert len(frames[paused]) >= 3
    for got, want in zip(frames[paused], frames[steady]):
        assert np.array_equal(got, want), "a suspended and resumed session left its uninterrupted twin"
    mgr.viewer_left(paused)
    executor = weakref.ref(mgr.sessions[paused].executor)
    clock.t += 6.0
    mgr.round()
    clock.t += 31.0
    mgr.round()
    gc.collect()
    assert paused not in mgr.sessions and mgr.server_stats()["expired"] == 1 and executor() is None
    with pytest.raises(SessionError):
        mgr.viewer_returned(paused)


def test_pause_and_prompt_switch_do_not_change_other_sessions(session):
    mgr = manager(session)
    busy, calm = mgr.open(RED, seed=3).id, mgr.open(BLUE, seed=4).id
    frames = collect(mgr, 6)
    mgr.pause(busy)
    frames = collect(mgr, 4, frames)
    mgr.resume(busy)
    switched_at = mgr.sessions[busy].next_tick.index
    mgr.set_prompt(busy, BLUE)
    frames = collect(mgr, 12, frames)
    assert_frames_equal(frames[calm], solo(session, BLUE, 4, seed=4), "the calm session")
    log = mgr.sessions[busy].prompt_log
    assert log == [(0, RED), (switched_at, BLUE)]
    replay = solo(session, lambda tick: BLUE if tick.index >= switched_at else RED, 3, seed=3)
    assert_frames_equal(frames[busy], replay, "the paused and switched session replayed alone")
    assert mgr.stats(busy)["version"] == 2


def test_the_demo_gets_its_measured_ladder_and_rung_zero_is_the_configured_cache(session):
    mgr = manager(session, degrade=True)
    assert mgr.limits.ladder == DEMO_STEPS and [r.steps for r in mgr.limits.levels] == [None, 3, 2]  # floor 23 dB
    assert mgr.session.preset.cache == session.preset.cache, "a ladder of steps alone needs no feature cache"
    assert manager(session).limits.rungs == (0.0,)
    cached = manager(session, degrade=True, ladder=DEMO_LADDER, floor_db=20.0)
    assert cached.session.preset.cache.policy == "flowcache"
    skip = cached.sessions[cached.open(RED, seed=0).id].executor.skip
    skip.set_fidelity(2.0)
    assert skip.policy.threshold == 2.0
    skip.set_fidelity(None)
    assert skip.policy.threshold == 0.0  # threshold 0: exactly no caching


def test_fewer_steps_before_any_stall_and_back_up_once_ahead(session):
    clock = FakeClock(per_read=0.04)  # every round seems to take 80 ms: 7.5 fps per session, 16 wanted
    mgr = manager(session, clock, degrade=True, batch=2)
    ids = [mgr.open(RED, seed=i).id for i in range(2)]
    first_degraded = first_stall = None
    steps = set()
    for r in range(60):
        for chunks in mgr.round_blocks().values():
            steps.update(c.steps or 4 for c in chunks)
            assert all(np.isfinite(c.pixels).all() for c in chunks)
        live = [mgr.sessions[sid] for sid in ids]
        if first_degraded is None and any(s.rung > 0 for s in live):
            first_degraded = r
        if first_stall is None and any(s.playout.stalls > 0 for s in live):
            first_stall = r
    assert first_degraded is not None and (first_stall is None or first_degraded < first_stall), (
        first_degraded, first_stall)  # fmt: skip
    assert 2 in steps and steps <= {4, 3, 2}, f"step counts used {steps} (the floor allows 4, 3, 2)"
    assert mgr.stats(ids[0])["fidelity_steps"] in (4, 3, 2)
    clock.per_read = 0.002  # rounds now seem to take 4 ms: every session gets ahead and comes back up
    collect(mgr, 30)
    assert all(mgr.sessions[sid].rung == 0 for sid in ids), [mgr.sessions[sid].rung for sid in ids]


def test_pyramid_plan_sessions_equal_their_solo_runs(session):
    pyramid = session.reconfigured(dataclasses.replace(session.preset, plan=dataclasses.replace(
        session.preset.plan, schedule="pyramid", offset=2)))  # fmt: skip
    mgr = manager(pyramid)
    a, b = mgr.open(RED, seed=5).id, mgr.open(BLUE, seed=6).id
    frames = collect(mgr, 9)  # block b finishes at tick 2 b + 3: blocks 0-2
    assert_frames_equal(frames[a], solo(pyramid, RED, 3, seed=5), "pyramid session a")
    assert_frames_equal(frames[b], solo(pyramid, BLUE, 3, seed=6), "pyramid session b")
    assert mgr.stats(a)["frames"] == 9


def test_a_desk_reports_an_expired_session_as_gone_and_serves_on(session):
    """An expired session is freed by the manager between two stats passes of its desk: the desk
    says it is gone (its viewers are told) and the replica keeps serving the others."""
    from engine.serving.live import SessionDesk

    clock = FakeClock()
    mgr = manager(session, clock, batch=2, grace_s=1.0, expire_s=2.0)
    desk = SessionDesk(mgr, stats_every_s=0.0, clock=clock)
    leaving, staying = mgr.open(RED, seed=1).id, mgr.open(BLUE, seed=2).id
    desk.versions.update({leaving: 1, staying: 1})  # as the desk's own open requests would
    desk.cycle([])
    mgr.viewer_left(leaving)
    gone = []
    for _ in range(3):
        clock.t += 1.5
        cycle = desk.cycle([])
        gone += cycle.gone
    assert gone == [leaving] and leaving not in mgr.sessions and staying in cycle.stats, gone


def measured(mgr: SessionManager, **round_s: float) -> SessionManager:
    """`mgr` with these seconds per round by batch size measured ({"b1": 0.03, ...}), as if it had run."""
    for batch, seconds in round_s.items():
        mgr.throughput.record(int(batch[1:]), seconds)
    return mgr


def test_admission_at_the_floor_then_an_offer_then_a_refusal(session):
    # 15 ms per round + 15 ms per session; 0.6 frames per tick, 90 % handed out: at full fidelity
    # 1 session keeps 16 fps (2 get 12 each); at the 2-step floor (5/3 as fast) 2 get 20, 3 get 15
    per = manager(session).kv_per_session
    mgr = measured(manager(session, degrade=True, kv_budget_bytes=int(3.5 * per)), b1=0.03, b2=0.045)
    a, b = mgr.open(RED, 0), mgr.open(BLUE, 1)
    assert isinstance(a, Opened) and isinstance(b, Opened), b
    third = mgr.open(RED, 2)
    assert isinstance(third, Refused) and third.offer_fps == 15.0, third
    assert "at the quality floor" in third.reason and "you may take 15.0 fps now" in third.reason
    taken = mgr.open(RED, 2, ticket=third.ticket, accept=True)
    assert isinstance(taken, Opened) and not mgr.queue, "the offer taken: its place in the queue is freed"
    fourth = mgr.open(RED, 3, accept=True)  # the KV budget holds three: no offer, the last resort
    assert isinstance(fourth, Refused) and fourth.offer_fps is None and "KV memory is full" in fourth.reason
    fifth = mgr.open(RED, 4)
    assert isinstance(fifth, Refused) and fifth.queue_position == 2 and fifth.offer_fps is None

    at_full = measured(manager(session, degrade=True, admit_at_floor=False), b1=0.03, b2=0.045)
    assert isinstance(at_full.open(RED, 0), Opened)
    second = at_full.open(RED, 1)
    assert isinstance(second, Refused) and "at full fidelity" in second.reason
    assert second.offer_fps == 16.0, "the floor would keep both at the full frame rate (fidelity lowered)"
    slow = measured(manager(session, degrade=True), b1=0.3, b2=0.45)  # ten times slower: 2 fps each is too little
    assert isinstance(slow.open(RED, 0), Opened)
    assert slow.open(RED, 1).offer_fps is None


def test_tickets_nobody_comes_back_for_expire_within_seconds(session):
    clock = FakeClock()
    per = manager(session).kv_per_session
    mgr = manager(session, clock, kv_budget_bytes=int(1.5 * per), retry_s=2.0, ticket_s=3.0)
    assert isinstance(mgr.open(RED, 0), Opened)
    gone = [mgr.open(RED, seed) for seed in (1, 2)]  # told to come back in 2 and 4 s; they never do
    assert [g.queue_position for g in gone] == [1, 2]
    clock.t += 5.5
    lone = mgr.open(RED, 3)
    assert lone.queue_position == 2, "the first ticket is given up 2 + 3 s after it was issued, the second not yet"
    clock.t += 2.0  # 7.5 s: both gone (the second at 4 + 3 s)
    again = mgr.open(RED, 3, ticket=lone.ticket)
    assert again.queue_position == 1, f"the lone viewer still waits behind {again.queue_position - 1} tickets"
    mgr.close(next(iter(mgr.sessions)))
    assert isinstance(mgr.open(RED, 3, ticket=again.ticket), Opened)


def test_a_session_restarts_from_an_upload_and_others_go_on(session):
    """`start_from`: an uploaded image becomes the session's first blocks (as a solo run started
    from it); a hostile upload is refused in one line and changes nothing; other sessions go on."""
    import base64
    import io

    from PIL import Image

    from engine.media import MediaError

    image = np.zeros((80, 120, 3), np.uint8)  # another resolution: center-cropped and resized
    image[30:50, 50:70] = (220, 40, 40)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    mgr = manager(session)
    moved, calm = mgr.open(RED, seed=3).id, mgr.open(BLUE, seed=4).id
    frames = collect(mgr, 4)
    hostile = {"not an image or video": b"plain text", "corrupt PNG": png.getvalue()[:60]}
    for says, upload in [("base64", "%%%")] + [(k, base64.b64encode(v).decode()) for k, v in hostile.items()]:
        with pytest.raises((MediaError, SessionError), match=says):
            mgr.start_from(moved, upload)
    assert mgr.start_from(moved, base64.b64encode(png.getvalue()).decode()) == {"blocks": 1, "latent_frames": 3}
    before = len(frames.get(moved, []))
    frames = collect(mgr, 16, frames)
    assert_frames_equal(frames[calm], solo(session, BLUE, 4, seed=4), "the other session")
    start = session.encode_start(image[None])
    after = [f for _, f in session.run(RED, blocks=2, seed=3, start=start).frames()]
    assert_frames_equal(frames[moved][before:], after, "the restarted session = a solo run from the image")
