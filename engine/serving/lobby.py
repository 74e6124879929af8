"""The server's sessions: which viewer watches which session, on which replica, and their counts.

A viewer that connects gets a session of its own (`open`), or joins one by its public id
(`join`: `/ws?session=ID`, which is also how a dropped viewer resumes within the grace period).
The lobby places a new session on the live replica with the most headroom and asks the next ones
if it refuses; when all refuse, the viewer gets the refusal (reason, retry-after, queue place).
Public ids are random (they are what a share link carries), not the managers' own ids, and are
mapped to (replica, the manager's id).

Threads: the lobby's tables are changed on the server's event loop only. Each replica's loop
thread calls `_on_cycle` with the frames of a pass: they are numbered here and handed to the
hub's encoder for the session's viewers only, so one session's frames, drops and timing never
touch another's. A session whose manager forgot it (expired) or whose replica failed is ended:
its viewers get {"type": "ended", "reason": ...} and are closed.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.serving.live import Cycle
from engine.serving.replicas import Replica, ReplicaDown, by_headroom

FPS_WINDOW_S = 3.0
PRIVATE = ("id", "kind", "prompt")
"""Fields of a manager's session stats that /stats and /metrics leave out (the id is a key)."""
NOT_READY_RETRY_S = 5.0
"""Retry-after told to viewers who connect while the model is still loading."""


class Refusal(Exception):
    """A session could not be opened now: what the viewer is told, before its connection closes."""

    def __init__(
        self,
        reason: str,
        retry_after_s: float | None = None,
        queue_position: int | None = None,
        ticket: str | None = None,
        offer_fps: float | None = None,
    ):
        super().__init__(reason)
        self.reason, self.retry_after_s, self.queue_position = reason, retry_after_s, queue_position
        self.ticket = ticket
        """Keeps the place in a replica's queue: the viewer passes it back (`/ws?ticket=`) when retrying."""
        self.offer_fps = offer_fps
        """The frame rate the viewer would get if admitted anyway (`/ws?accept=1`); None: no offer."""

    def message(self) -> dict:
        return {"reason": self.reason, "retry_after_s": self.retry_after_s, "queue_position": self.queue_position,
                "ticket": self.ticket, "offer_fps": self.offer_fps}  # fmt: skip


@dataclass(eq=False)
class Watched:
    """One session as the server sees it (its viewers, counts and the manager's latest stats)."""

    id: str
    number: int
    """Public ordinal: labels the session in /metrics and /stats without giving away its id."""
    replica: Replica
    prompt: str
    seed: int
    local: str | None = None
    version: int = 0
    paused: bool = False
    viewers: set = field(default_factory=set)
    frames: int = 0
    fps: float = 0.0
    opened_at: float = 0.0
    first_frame_s: float | None = None
    last_switch_s: float | None = None
    requested: dict[int, float] = field(default_factory=dict)
    dropped: int = 0
    """Frames the viewers' queues dropped."""
    encoder_dropped: int = 0
    stats: dict = field(default_factory=dict)
    """The manager's stats of this session (slack, stalls, fidelity, cache hits, ...)."""
    ended: str | None = None
    _recent: deque = field(default_factory=deque)

    def count(self, frames: int, version: int, now: float) -> int:
        """Account for `frames` new frames (on the replica's thread); returns the first one's index."""
        first = self.frames
        self.frames += frames
        if self.first_frame_s is None:
            self.first_frame_s = now - self.opened_at
        requested = self.requested.pop(version, None)
        if requested is not None:
            self.last_switch_s = now - requested
        self._recent.append((now, frames))
        while now - self._recent[0][0] > FPS_WINDOW_S:
            self._recent.popleft()
        span = now - self._recent[0][0]
        self.fps = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0
        return first

    def summary(self) -> dict:
        """What /stats says of this session (no id: the id is a key to the session)."""
        return {**self.stats, "session": self.number, "replica": self.replica.index, "viewers": len(self.viewers),
                "frames": self.frames, "fps": round(self.fps, 2), "first_frame_s": self.first_frame_s,
                "paused": self.paused, "dropped": self.dropped, "encoder_dropped": self.encoder_dropped}  # fmt: skip


class Lobby:
    """Sessions over replicas. `publish(frames, first_index, version, seconds, audience)` is the
    hub's (engine/serving/server.py); `end(watched, reason)` tells a session's viewers it ended."""

    def __init__(
        self,
        publish: Callable,
        *,
        prompt: str,
        seed: int,
        fps: int = 16,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.publish, self.prompt, self.seed, self.fps, self.clock = publish, prompt, seed, fps, clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self.replicas: list[Replica] = []
        self.sessions: dict[str, Watched] = {}
        self.routes: dict[tuple[int, str], Watched] = {}
        self.on_end: Callable[[Watched, str], None] = lambda watched, reason: None
        self.opened = self.refused = 0
        self._numbers = itertools.count(1)

    def attach(self, replicas: list[Replica], wait_s: float = 30.0) -> None:
        """Start serving sessions on these replicas (once the model is loaded). Waits (at most
        `wait_s`) until each has said how much room it has, so the first viewers are spread
        by what the replicas hold, not by which answered first."""
        for replica in replicas:
            replica.start(self._on_cycle, self._on_failure)
        for replica in replicas:
            replica.heard.wait(wait_s)
        self.replicas = replicas

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    # -- on the event loop -----------------------------------------------------------------------

    async def open(
        self,
        viewer,
        ticket: str | None = None,
        prompt: str | None = None,
        seed: int | None = None,
        accept: bool = False,
    ) -> Watched:
        """A new session for `viewer` on the replica with most room (Refusal when none takes it);
        with a `ticket` from an earlier refusal, its replica is asked first, keeping the place in
        its queue. `accept`: take a lower frame rate if that is what a replica offers (every
        replica is first asked for a full-rate place, then the best offer is taken). The viewer
        is in the session before the manager has it, so no frame is lost."""
        if not any(r.alive for r in self.replicas):
            self.refused += 1
            reason = "every replica has failed" if self.replicas else "the model is still loading"
            raise Refusal(reason, NOT_READY_RETRY_S if not self.replicas else None)
        number = next(self._numbers)
        prompt, seed = prompt or self.prompt, self.seed + number - 1 if seed is None else seed
        refusals = []
        queued_on, _, place = (ticket or "").partition(".")
        ordered = by_headroom(self.replicas)
        ordered.sort(key=lambda r: str(r.index) != queued_on)  # stable: the rest by headroom
        for replica in ordered:
            mine = place if place and str(replica.index) == queued_on else None
            watched = await self._open_on(replica, viewer, number, prompt, seed, (mine,), refusals)
            if watched is not None:
                return watched
        offers = sorted((r for r in refusals if r.offer_fps), key=lambda r: -r.offer_fps)
        if accept and offers:  # the best offer first; it may be gone by now, so the next, ...
            for refusal in offers:
                mine = (refusal.ticket or "").partition(".")[2] or None
                watched = await self._open_on(refusal.replica, viewer, number, prompt, seed, (mine, True), refusals)
                if watched is not None:
                    return watched
        self.refused += 1
        raise min(refusals, key=lambda r: (r.retry_after_s is None, r.retry_after_s or 0, -(r.offer_fps or 0)))

    async def _open_on(self, replica, viewer, number, prompt, seed, extra: tuple, refusals: list):
        """The session if `replica`'s manager opens it (`extra`: ticket, accept), else None (its
        refusal appended to `refusals`)."""
        watched = Watched(secrets.token_urlsafe(9), number, replica, prompt, seed, opened_at=self.clock())
        watched.viewers.add(viewer)
        args = (prompt, seed, *extra) if any(extra) else (prompt, seed)
        answer = await self._ask(watched, replica.submit("open", *args), route=True)
        if watched.local is not None:
            replica.placed_since_stats += 1
            self.sessions[watched.id], self.opened = watched, self.opened + 1
            return watched
        refusals.append(_refusal(answer, replica))
        return None

    async def join(self, public_id: str, viewer) -> Watched:
        """The session `public_id` names, with `viewer` in it (LookupError if it ended)."""
        watched = self.sessions.get(public_id)
        if watched is None:
            raise LookupError("no such session (it ended, or the id is wrong): open the page without ?session=")
        op = "join" if watched.viewers else "viewer_returned"
        watched.viewers.add(viewer)
        answer = await self._ask(watched, watched.replica.submit(op, watched.local))
        if "ok" in answer and not _refused(answer):
            return watched
        watched.viewers.discard(viewer)
        if _refused(answer):  # e.g. a suspended session with no room to resume yet
            raise _refusal(answer)
        self.end(watched, f"the session ended: {answer['error']}")
        raise LookupError(f"the session has ended: {answer['error']}")

    async def control(self, watched: Watched, op: str, *args) -> dict:
        """`op` on the session's manager: {"ok": ...} or {"error": ...}."""
        future = watched.replica.submit(op, watched.local, *args)
        if op == "set_prompt":  # noted on the replica's thread, before the new version's first frames
            asked = self.clock()
            future.add_done_callback(lambda f: _note_switch(watched, f, asked))
        answer = await self._ask(watched, future)
        if "ok" in answer and op == "set_prompt":
            watched.version, watched.prompt = answer["ok"]["version"], args[0]
        if "ok" in answer and op in ("pause", "resume"):
            watched.paused = op == "pause"
        return answer

    def viewer_gone(self, watched: Watched, viewer) -> None:
        """The manager counts viewers: its last one leaving starts the grace period."""
        watched.viewers.discard(viewer)
        if watched.ended is None:
            watched.replica.submit("viewer_left", watched.local)

    def end(self, watched: Watched, reason: str) -> None:
        if watched.ended is not None:
            return
        watched.ended = reason
        self.sessions.pop(watched.id, None)
        self.routes.pop((watched.replica.index, watched.local), None)
        self.on_end(watched, reason)

    async def _ask(self, watched: Watched, future, route: bool = False) -> dict:
        if route:  # routed on the replica's thread as the answer lands, before that pass's frames
            future.add_done_callback(lambda f: self._route(watched, f))
        try:  # shielded: a caller cancelled while waiting (its viewer hung up) must not cancel the
            # replica's future, which the replica's thread then could not fill (InvalidStateError kills it)
            return await asyncio.shield(asyncio.wrap_future(future))
        except ReplicaDown as err:
            return {"error": str(err)}

    def _route(self, watched: Watched, future) -> None:
        if future.exception() is None and isinstance(future.result().get("ok"), dict):
            local = future.result()["ok"].get("id")
            if local is not None:
                watched.local = str(local)
                self.routes[(watched.replica.index, watched.local)] = watched

    # -- on a replica's thread -----------------------------------------------------------------------

    def _on_cycle(self, replica: Replica, cycle: Cycle) -> None:
        now = self.clock()
        for local, blocks in cycle.blocks.items():
            watched = self.routes.get((replica.index, local))
            if watched is None:
                continue
            for frames, version in zip(blocks, cycle.versions.get(local, [0] * len(blocks))):
                first = watched.count(len(frames), version, now)
                self.publish(frames, first, version, now - watched.opened_at, audience=watched)
        for local, stats in (cycle.stats or {}).items():
            watched = self.routes.get((replica.index, local))
            if watched is not None:
                watched.stats = {k: v for k, v in stats.items() if k not in PRIVATE}
        for local in cycle.gone:
            watched = self.routes.get((replica.index, local))
            if watched is not None:
                self.loop.call_soon_threadsafe(self.end, watched, "the session ended (no viewer for too long)")

    def _on_failure(self, replica: Replica, reason: str) -> None:
        def end_all():
            for watched in [w for w in self.sessions.values() if w.replica is replica]:
                self.end(watched, f"{reason}; open the page again for a new session")

        self.loop.call_soon_threadsafe(end_all)

    def summary(self) -> dict:
        """Server-wide numbers for /stats and /metrics."""
        replicas = [{"replica": r.index, "name": r.name, "up": r.alive, "failure": r.failure or None,
                     **{k: v for k, v in r.server.items() if k != "kind"}} for r in self.replicas]  # fmt: skip
        sessions = list(self.sessions.values())
        return {"sessions": len(sessions), "sessions_opened_total": self.opened, "sessions_refused_total": self.refused,
                "viewers": sum(len(w.viewers) for w in sessions), "video_fps": round(sum(w.fps for w in sessions), 2),
                "replicas_up": sum(r.alive for r in self.replicas), "replicas": replicas,
                "per_session": [w.summary() for w in sessions]}  # fmt: skip


def _note_switch(watched: Watched, future, asked: float) -> None:
    if future.exception() is None and "ok" in future.result():
        watched.requested[future.result()["ok"]["version"]] = asked


def _refused(answer: dict) -> bool:
    return isinstance(answer.get("ok"), dict) and answer["ok"].get("kind") == "Refused"


def _refusal(answer: dict, replica: Replica | None = None) -> Refusal:
    """A manager's answer that gave no session, as a Refusal (its queue ticket tagged with the replica)."""
    body = answer.get("ok") if isinstance(answer.get("ok"), dict) else {}
    if "error" in answer:
        return Refusal(answer["error"])
    ticket = body.get("ticket")
    ticket = f"{replica.index}.{ticket}" if ticket and replica is not None else None
    refusal = Refusal(str(body.get("reason", "no room for another session")), body.get("retry_after_s"),
                      body.get("queue_position"), ticket, body.get("offer_fps"))  # fmt: skip
    refusal.replica = replica  # who made the offer, if any
    return refusal
