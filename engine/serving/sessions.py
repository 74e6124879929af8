"""Many sessions on one loaded model: each viewer its own stream, stepped together by playout slack.

    manager = SessionManager(session, Limits(kv_budget_bytes=64 << 20))
    opened = manager.open("a red circle moving left", seed=0)     # Opened(id) or Refused(...)
    while serving:
        for sid, blocks in manager.round().items():                 # one scheduling round
            send(sid, blocks)                                        # each [F, H, W, 3] uint8

A session is one stream: its own prompt, seed, plan position, KV cache, cache-policy state and
decoder state. `round()` picks sessions (engine/serving/scheduler.py: least slack first, none
starved, fidelity lowered for those about to stall), runs one tick of each with their forwards
coalesced (engine/runtime/coalesce.py), decodes finished blocks and hands the frames out. Nothing
here opens a socket or sleeps: a server drives it, a benchmark drives it with the real clock, tests
with a fake one.

Each session's viewer is modelled by a `Playout` clock: it plays at the stream's fps from the first
frame, stops while the session is paused or has no viewer, and stalls when it reaches the end of
the video generated so far (it then waits; the seconds waited are stall seconds). A server whose
viewers report what they have played passes that on with `played(id, seconds)`.

Fidelity (scheduler.py's ladder): a rung is a feature-cache threshold, set on the session's skip
part per round, or fewer denoising steps for a few-step model, set on its plan
(engine/plan/steps.py: blocks that start from then on take that many steps). Steps change only
for a session on one process (its executor places every block locally).

Video in: `video_in(id, source, strength)` plugs a source (a `FrameFeed` a camera pushes into, or
any iterator of uint8 `[H, W, 3]` frames) into a running session: from its next block on, each
block starts from the source's newest frames noised to `strength` (engine/runtime/video_in.py);
the round never waits for a feed (a stalled one holds its last picture), and once the source ends
the session goes on from its prompt. `video_in(id, None)` unplugs it. Sessions on one process only.

Admission: a viewer beyond what the measured speed keeps at the floor's fidelity is refused with
the frame rate it would get if admitted all the same (`Refused.offer_fps`, every session sharing
the rounds); `open(..., accept=True)` takes it. A refusal without an offer is the last resort
(the KV memory is full, or the rate would be below `Limits.min_offer_fps`).

Life of a session: open (or queued with a retry-after) -> running -> viewer_left: idle for
`grace_s`, device state kept -> suspended: its executor's state moved to host memory -> after
`expire_s` expired and freed. `viewer_returned` / `join` bring an idle or suspended session back;
a suspended one resumes bit-exactly where it stopped.

On a rank group (a cascade or sp of ranks), this manager runs on the group's leader with an
`Outbox`: whatever it does to a session's device state, and every round's choice of sessions,
goes to the group's other ranks, which step their share of the same sessions in the same order
(engine/serving/group.py); finished blocks arrive here, at the group's sink, to be decoded.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.config import CacheConfig, ConfigError
from engine.devices import SetupError
from engine.media import MediaLimits, load_media
from engine.models.vae import to_uint8
from engine.plan.sigmas import Schedule
from engine.plan.steps import Adjustable, fewer_steps, step_choices
from engine.plan.timeline import Tick, blocks_per_tick
from engine.runtime.coalesce import step_together
from engine.runtime.executor import Executor
from engine.runtime.placement import Local
from engine.runtime.session import Session
from engine.runtime.video_in import InputSlot
from engine.sampling.noise import NoiseSource
from engine.serving.group import Outbox
from engine.serving.scheduler import (
    EXACT,
    LADDERS,
    Limits,
    Playout,
    Rung,
    Standing,
    Throughput,
    Verdict,
    admission,
    choose,
    next_rung,
)

FPS_WINDOW_S = 3.0
PROMPT_LOG = 1000
"""Prompt switches kept per session (tick, prompt): enough to replay a session alone."""


class SessionError(ValueError):
    """A request about a session that does not exist (any more)."""


@dataclass(frozen=True)
class Opened:
    id: str
    joined: bool = False
    """True when the viewer joined a session that was already running."""


@dataclass(frozen=True)
class Refused:
    reason: str
    """One line: why, and what to do."""
    retry_after_s: float
    queue_position: int | None
    """1 = next to be admitted; None when the queue is full too."""
    ticket: str | None = None
    """Pass it to `open` again to keep the place in the queue."""
    offer_fps: float | None = None
    """The frame rate this viewer would get if admitted now anyway (`open(..., accept=True)`);
    None when there is no such offer (no room in memory, too slow, nothing measured yet)."""


@dataclass(frozen=True)
class Frames:
    """One finished block of one session, decoded."""

    block: int
    first_frame: int
    """Index of its first frame in the session's video."""
    pixels: np.ndarray
    """`[F, H, W, 3]` uint8."""
    version: int
    """The prompt version in force when the block finished."""
    threshold: float
    """The feature-cache threshold of its lowest-fidelity rung (0: nothing skipped)."""
    rung: int = 0
    """The lowest-fidelity rung its ticks ran under (0: full fidelity)."""
    steps: int | None = None
    """Denoising steps of that rung (None: the plan's own)."""
    latents: object = None
    """The block's clean latents `[1, C, F, h, w]` (what was decoded), for checks against a solo run."""


@dataclass
class Live:
    """One session's state in the manager."""

    id: str
    seed: int
    prompt: str
    text: object
    executor: Executor
    decoder: object
    ticks: object
    next_tick: Tick
    playout: Playout
    opened_at: float
    viewers: int = 1
    state: str = "running"
    """running, idle (no viewer, within the grace period) or suspended."""
    paused: bool = False
    since: float = 0.0
    """When it became idle or suspended."""
    version: int = 1
    rung: int = 0
    block_rung: int = 0
    waited: int = 0
    served_at: int = 0
    most_waited: int = 0
    frames: int = 0
    degraded_blocks: int = 0
    host_bytes: int = 0
    """What its suspension moved to host memory."""
    recent: deque = field(default_factory=deque)
    """(time, frames) of recent blocks, for its FPS."""
    prompt_log: list = field(default_factory=list)
    """(tick index, prompt) of every prompt it ran under, first at tick 0."""
    slot: InputSlot | None = None
    """Where video in plugs in (None on a rank group: sessions there take none)."""

    @property
    def wants_ticks(self) -> bool:
        return self.state == "running" and not self.paused


class SessionManager:
    def __init__(
        self,
        session: Session,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        outbox: Outbox | None = None,
        media_limits: MediaLimits | None = None,
    ):
        """`outbox`: on a rank group's leader, where the group's other ranks hear of every round.
        `media_limits`: what `start_from` accepts (engine/media's defaults)."""
        plan = session.preset.plan
        if plan.schedule == "skyreels":
            raise ConfigError("sessions run endless plans (sequential, pyramid): the skyreels schedule is finite")
        local = isinstance(session.executors(NoiseSource(0), blocks_in_forward=1).placement, Local)  # freed at once
        limits = self._with_ladder(limits, session, local)
        if any(rung.threshold > 0 for rung in limits.levels) and not session.preset.cache.enabled:
            # threshold 0 is exactly no caching; the scheduler raises it per session and round
            session = session.reconfigured(dataclasses.replace(session.preset, cache=CacheConfig(policy="flowcache")))
        self.session, self.limits, self.clock, self.outbox = session, limits, clock, outbox
        self.media_limits = media_limits or MediaLimits()
        self.schedules: dict[int, Schedule] = {
            rung.steps: fewer_steps(session.preset.sampling, rung.steps) for rung in limits.levels if rung.steps
        }  # fmt: skip
        self.fps = session.preset.stream.fps
        steps = session.schedule.steps
        self.offset = steps + 1 if plan.schedule == "sequential" else plan.offset
        self.in_forward = blocks_per_tick(
            session.schedule, None if plan.schedule == "sequential" else plan.offset, None
        )
        self.kv_per_session = self._executor(0).cache.nbytes
        self.throughput = Throughput()
        self.sessions: dict[str, Live] = {}
        self.queue: OrderedDict[str, float] = OrderedDict()
        self.rounds, self.refused, self.expired = 0, 0, 0
        self.batches: Counter[int] = Counter()
        self.recent: deque = deque()

    @staticmethod
    def _with_ladder(limits: Limits, session: Session, local: bool) -> Limits:
        """The preset's measured ladder unless one was given (cache rungs only under flowcache or no
        cache; step rungs only for a few-step model whose blocks all run on this process)."""
        ladder = limits.ladder
        if ladder is None:
            ladder = LADDERS.get(session.preset.name, EXACT)
        steps = step_choices(session.preset.sampling) if local else (session.schedule.steps,)
        cache_ok = session.preset.cache.policy in ("none", "flowcache")

        def usable(rung: Rung) -> bool:
            return (rung.threshold == 0 or cache_ok) and (rung.steps is None or rung.steps in steps)

        kept = tuple(rung for rung in ladder if usable(Rung(*rung)))
        return dataclasses.replace(limits, ladder=kept if len(kept) > 1 else EXACT)

    # -- opening and closing ---------------------------------------------------------------------

    def open(self, prompt: str, seed: int, ticket: str | None = None, accept: bool = False) -> Opened | Refused:
        """A new session, or a refusal with a retry-after, a place in the queue (`ticket` keeps
        the place: pass it back when retrying) and maybe the frame rate on offer now. `accept`:
        take that offer (the session is opened if there still is one)."""
        now = self.clock()
        self._drop_stale_tickets(now)
        if ticket not in self.queue:
            ticket = None  # unknown or given up: a new request, at the back
        verdict = self._verdict()
        taken = accept and not verdict.admit and self._offer(verdict) is not None
        if not taken and (next(iter(self.queue), ticket) != ticket or not verdict.admit):
            return self._queued(now, ticket, verdict)
        self.queue.pop(ticket, None)
        live = self._start(prompt, seed, now)
        self.sessions[live.id] = live
        return Opened(live.id)

    def _queued(self, now: float, ticket: str | None, verdict: Verdict) -> Refused:
        self.refused += 1
        reason = verdict.reason or "sessions queued before this one go first"
        offer = self._offer(verdict)
        offered = "" if offer is None else f"; you may take {offer:.1f} fps now instead"
        if ticket is None:
            if len(self.queue) >= self.limits.queue:
                return Refused(f"server full: {reason}; the queue is full too, try again later{offered}",
                               self.limits.retry_s * (len(self.queue) + 1), None, offer_fps=offer)  # fmt: skip
            ticket = secrets.token_urlsafe(8)
            self.queue[ticket] = now
        position = list(self.queue).index(ticket) + 1
        retry = self.limits.retry_s * position
        self.queue[ticket] = now + retry + self.limits.ticket_s  # given up unless asked for again by then
        return Refused(f"server full: {reason}; you are number {position} in the queue{offered}",
                       retry, position, ticket, offer)  # fmt: skip

    def _drop_stale_tickets(self, now: float) -> None:
        for ticket in [t for t, deadline in self.queue.items() if now > deadline]:
            del self.queue[ticket]

    def _offer(self, verdict: Verdict) -> float | None:
        """The frame rate one more session would get now (every session sharing the rounds at the
        floor), if memory has room for it and the rate is at least `min_offer_fps`."""
        if verdict.admit or not verdict.memory or self.limits.min_offer_fps <= 0:
            return None
        running = sum(1 for s in self.sessions.values() if s.wants_ticks)
        speedup = self.limits.floor_speedup(self.session.schedule.steps)
        rate = self.throughput.per_session_fps(running + 1, self.frames_per_tick, self.limits, speedup)
        if rate is None or rate < self.limits.min_offer_fps:
            return None
        return round(float(min(rate, self.fps)), 1)

    def _verdict(self):
        """Whether one more session may hold device state and ticks now."""
        running = sum(1 for s in self.sessions.values() if s.wants_ticks)
        capacity = self.throughput.sessions(self.fps, self.frames_per_tick, self.limits, most=running + 1,
                                            speedup=self.admission_speedup)  # fmt: skip
        return admission(running=running, kv_in_use=self.kv_bytes, kv_per_session=self.kv_per_session,
                         capacity=capacity, limits=self.limits)  # fmt: skip

    def _executor(self, seed: int, prefix: dict | None = None) -> Executor:
        in_forward = max(self.in_forward, len(prefix or ()) + 1)  # a start's commits beside the first block
        executor = self.session.executors(NoiseSource(seed), blocks_in_forward=in_forward)
        executor.start(prefix=prefix)
        return executor

    def _plan(self, pre_ready: int = 0, slot: InputSlot | None = None):
        """The session's endless plan: one whose step count can change when the ladder has step
        rungs, and whose blocks' schedules a video-in slot chooses."""
        if not self.schedules and slot is None:
            return self.session.plan(None, pre_ready=pre_ready)
        plan, stream = self.session.preset.plan, self.session.preset.stream
        offset = None if plan.schedule == "sequential" else plan.offset
        window = stream.window_frames // stream.frames_per_block
        return Adjustable(self.session.schedule, offset, window, pre_ready, choose=slot and slot.schedule_for)

    def new_stream(self, seed: int) -> tuple[Executor, object]:
        """A session's executor and endless plan (the leader's and its followers' alike)."""
        return self._executor(seed), self._plan()

    def _slotted_stream(self, seed: int, prefix: dict | None = None) -> tuple[Executor, object, InputSlot | None]:
        """`new_stream` (after a given start's `prefix` blocks), with a slot for video in when the
        manager runs on one process."""
        executor = self._executor(seed, prefix)
        if self.outbox is not None:
            return executor, self._plan(len(prefix or ())), None
        slot = InputSlot(executor)
        executor.start(initial=slot.initial, prefix=prefix)
        return executor, self._plan(len(prefix or ()), slot), slot

    def _start(self, prompt: str, seed: int, now: float) -> Live:
        executor, ticks, slot = self._slotted_stream(seed)
        decoder = copy.copy(self.session.decoder)  # shares the weights; its own causal state
        decoder.reset()
        live = Live(secrets.token_urlsafe(6), seed, prompt, self.session.prompts.conditioning(prompt),
                    executor, decoder, ticks, next(ticks), Playout(self.fps), now, slot=slot)  # fmt: skip
        live.prompt_log.append((0, prompt))
        self._tell("open", live.id, seed, prompt)
        return live

    def _tell(self, op: str, sid: str, *args) -> None:
        """Record a change of a session's device state for the group's other ranks."""
        if self.outbox is not None:
            self.outbox.add(op, sid, *args)

    def stop_group(self) -> None:
        """On a group's leader: its other ranks stop following (they return)."""
        if self.outbox is not None:
            self.outbox.stop()

    def close(self, sid: str) -> None:
        """End a session and free everything it holds."""
        self._get(sid)
        del self.sessions[sid]
        self._tell("close", sid)

    def _get(self, sid: str) -> Live:
        live = self.sessions.get(sid)
        if live is None:
            raise SessionError(f"no session {sid!r} (it ended or expired): open a new one")
        return live

    # -- controls --------------------------------------------------------------------------------

    def set_prompt(self, sid: str, prompt: str) -> int:
        """Switch the session's prompt from its next tick; returns the new prompt version."""
        live = self._get(sid)
        live.prompt, live.text = prompt, self.session.prompts.conditioning(prompt)
        live.version += 1
        live.prompt_log.append((live.next_tick.index, prompt))
        self._tell("prompt", sid, prompt)
        del live.prompt_log[1:-PROMPT_LOG]
        return live.version

    def video_in(self, sid: str, source, strength: float = 0.6) -> dict:
        """Plug `source` (a FrameFeed, or an iterator of uint8 `[H, W, 3]` frames; None unplugs)
        into the session: blocks that start from now on take its frames, noised to `strength`."""
        live = self._get(sid)
        if live.slot is None:
            raise ConfigError("video in runs on sessions of one process, not on a rank group")
        video = None if source is None else self.session.video_input(source, strength, live.executor.noise, 0.0)
        live.slot.video = video
        return {"strength": None if video is None else video.strength}

    def start_from(self, sid: str, upload: str) -> dict:
        """Restart the session's stream from an uploaded image or clip (`upload`: the file's bytes
        in base64, checked by engine/media): its frames, encoded by the family's VAE, become the
        stream's first blocks and the session goes on from them under its prompt and seed. The
        viewer's video goes on (its frame count too); what came before is dropped."""
        live = self._get(sid)
        if self.outbox is not None:
            raise SessionError("a session on a rank group cannot start from an upload yet; use one-process replicas")
        if live.state == "suspended":
            raise SessionError("the session is suspended: resume it before starting it from an upload")
        try:
            data = base64.b64decode(upload, validate=True)
        except (ValueError, TypeError) as err:
            raise SessionError("an upload must be base64 text") from err
        try:
            start = self.session.encode_start(load_media(data, self.media_limits).frames)
        except SetupError as err:  # a family without an encoder for given frames (yet)
            raise SessionError(str(err)) from None
        prefix = self.session.start_blocks(start)
        live.executor, live.ticks, live.slot = self._slotted_stream(live.seed, prefix)  # video in unplugged
        live.next_tick = next(live.ticks)
        self.set_steps(live.ticks, self.limits.levels[live.rung].steps)
        live.decoder.reset()
        live.decoder.decode(start)  # a causal decoder goes on from the given frames
        live.prompt_log = [(0, live.prompt)]
        return {"blocks": len(prefix), "latent_frames": int(start.shape[2])}

    def pause(self, sid: str) -> None:
        live = self._get(sid)
        live.paused = True
        live.playout.hold("paused", self.clock())

    def resume(self, sid: str) -> None:
        live = self._get(sid)
        live.paused = False
        live.playout.release("paused", self.clock())

    def played(self, sid: str, seconds: float) -> None:
        """The viewer's report of how much of the video it has played."""
        self._get(sid).playout.report(seconds, self.clock())

    def join(self, sid: str) -> Opened | Refused:
        """Another viewer of an existing session: it gets the same frames from now on."""
        result = self.viewer_returned(sid)
        return Opened(sid, joined=True) if isinstance(result, Opened) else result

    def viewer_left(self, sid: str) -> None:
        live = self._get(sid)
        live.viewers = max(live.viewers - 1, 0)
        if live.viewers == 0 and live.state == "running":
            live.state, live.since = "idle", self.clock()
            live.playout.hold("idle", live.since)

    def viewer_returned(self, sid: str) -> Opened | Refused:
        """A viewer is back (or joins): an idle session runs again, a suspended one resumes."""
        live, now = self._get(sid), self.clock()
        if live.state == "suspended":
            verdict = self._verdict()
            if not verdict.admit:
                self.refused += 1
                return Refused(f"cannot resume now: {verdict.reason}", self.limits.retry_s, None)
            live.executor.resume()
            self._tell("resume", sid)
            live.host_bytes = 0
        live.viewers += 1
        if live.state != "running":
            live.state = "running"
            live.playout.release("idle", now)
        return Opened(sid)

    # -- the round -------------------------------------------------------------------------------

    def round(self) -> dict[str, list[np.ndarray]]:
        """One scheduling round: each session's finished blocks as frames `[F, H, W, 3]` uint8."""
        return {sid: [chunk.pixels for chunk in chunks] for sid, chunks in self.round_blocks().items()}

    def round_blocks(self) -> dict[str, list[Frames]]:
        """One scheduling round: each chosen session steps one tick (more while its ticks skip
        their forward), coalesced; finished blocks are decoded and handed out per session, with
        their prompt version and fidelity."""
        start = self.clock()
        self._housekeep(start)
        wanting = [s for s in self.sessions.values() if s.wants_ticks]
        standings = [self._standing(s, start) for s in wanting]
        chosen = [self.sessions[s.id] for s in choose(standings, self.limits)]
        if not chosen:
            return {}
        self._set_fidelity(chosen, standings)
        finished = self._step(chosen)
        end = self.clock()
        out = {s.id: self._hand_out(s, blocks, end) for s, blocks in zip(chosen, finished)}
        self._account(chosen, standings, start, end)
        return {sid: frames for sid, frames in out.items() if frames}

    def _standing(self, live: Live, now: float) -> Standing:
        started = live.playout.first_at is not None
        return Standing(live.id, live.playout.slack(now), live.waited, self._ticks_to_frames(live),
                        started, live.served_at)  # fmt: skip

    def _ticks_to_frames(self, live: Live) -> int:
        """Ticks until the session's next block finishes, its next tick included: the first working
        block's steps left, or (a tick that only commits) a whole block at the rung's steps."""
        working = [w for w in live.next_tick.work if not w.commit]
        if working:
            return working[0].steps - working[0].step
        return (self.limits.levels[live.rung].steps or self.session.schedule.steps) + 1

    def _set_fidelity(self, chosen: list[Live], standings: list[Standing]) -> None:
        levels = self.limits.levels
        due = sum(1 for s in standings if s.slack_s < self.limits.target_slack_s)
        round_s = self.throughput.estimate(min(due, self.limits.batch))
        by_id = {s.id: s for s in standings}
        video_per_tick = self.frames_per_tick / self.fps
        for live in chosen:
            live.rung = next_rung(live.rung, by_id[live.id], round_s, due, self.limits, video_per_tick)
            live.block_rung = max(live.block_rung, live.rung)
            rung = levels[live.rung]
            live.executor.skip.set_fidelity(rung.threshold if live.rung else None)  # rung 0: as configured
            self.set_steps(live.ticks, rung.steps)

    def set_steps(self, ticks, steps: int | None) -> None:
        """Blocks of this plan that start from now on take `steps` steps (None: the plan's own)."""
        if self.schedules:
            ticks.set_schedule(self.schedules.get(steps, self.session.schedule))

    def _step(self, chosen: list[Live]) -> list[list]:
        """One tick each; a session whose tick skipped its forward (feature caching) takes its next
        tick too, up to a block's worth, so a lower fidelity buys it speed. On a rank group, one
        tick each: whether a rank's tick skipped is its own, and the group must agree."""
        if self.outbox is not None:
            levels = self.limits.levels
            self.outbox.round([(live.id, levels[live.rung].threshold if live.rung else None, levels[live.rung].steps)
                               for live in chosen])  # fmt: skip
            return self.step_streams(chosen)
        finished = [[] for _ in chosen]
        pending = list(range(len(chosen)))
        for _ in range(self.offset):
            before = [chosen[i].executor.stats.forwards for i in pending]
            for i, blocks in zip(pending, self.step_streams([chosen[i] for i in pending])):
                finished[i].extend(blocks)
            pending = [i for i, b in zip(pending, before) if chosen[i].executor.stats.forwards == b]
            if not pending:
                break
        return finished

    @staticmethod
    def step_streams(streams: list) -> list[list]:
        """One tick of each stream (anything with `executor`, `next_tick`, `ticks`, `text`), forwards
        coalesced where they can be; each stream's finished blocks where its output is (all of them
        on its group's sink, none on the group's other ranks), and its next tick drawn."""
        items = [(s.executor, s.next_tick, s.text) for s in streams]
        out = []
        for stream, (executor, tick, _), blocks in zip(streams, items, step_together(items)):
            out.append(list(executor.placement.deliver(executor, tick, blocks)))
            stream.next_tick = next(stream.ticks)
        return out

    def _hand_out(self, live: Live, blocks: list, now: float) -> list[Frames]:
        out = []
        for block in blocks:
            pixels = to_uint8(live.decoder.decode(block.latents))
            rung = self.limits.levels[live.block_rung]
            out.append(Frames(block.index, live.frames, pixels, live.version, rung.threshold, live.block_rung,
                              rung.steps, block.latents))  # fmt: skip
            live.degraded_blocks += live.block_rung > 0
            live.block_rung = live.rung
            live.frames += len(pixels)
            live.playout.add(len(pixels), now)
            live.recent.append((now, len(pixels)))
            self.recent.append((now, len(pixels)))
        return out

    def _account(self, chosen: list[Live], standings: list[Standing], start: float, end: float) -> None:
        self.rounds += 1
        self.batches[len(chosen)] += 1
        if all(s.rung == 0 for s in chosen):  # degraded rounds are cheaper than the capacity they measure
            self.throughput.record(len(chosen), end - start)
        served = {s.id for s in chosen}
        for standing in standings:
            live = self.sessions[standing.id]
            if standing.id in served:
                live.waited, live.served_at = 0, self.rounds
            elif standing.slack_s < self.limits.target_slack_s:
                live.waited += 1
                live.most_waited = max(live.most_waited, live.waited)

    def _housekeep(self, now: float) -> None:
        """Idle sessions past the grace period are suspended; suspended ones past expiry freed."""
        self._drop_stale_tickets(now)
        for live in list(self.sessions.values()):
            if live.state == "idle" and now - live.since >= self.limits.grace_s:
                live.host_bytes = live.executor.suspend()
                self._tell("suspend", live.id)
                live.state, live.since = "suspended", now
            elif live.state == "suspended" and now - live.since >= self.limits.expire_s:
                del self.sessions[live.id]
                self._tell("close", live.id)
                self.expired += 1

    # -- stats -----------------------------------------------------------------------------------

    @property
    def frames_per_tick(self) -> float:
        """Video frames a session gets per tick it is served at full fidelity, in the long run: the
        plan's frames per block over its ticks per block (a lower rung yields more, not counted)."""
        return self.session.preset.stream.frames_per_block / self.offset

    @property
    def admission_speedup(self) -> float:
        """1, or with `admit_at_floor` the speed the floor's fidelity adds (see Limits.floor_speedup)."""
        return self.limits.floor_speedup(self.session.schedule.steps) if self.limits.admit_at_floor else 1.0

    @property
    def kv_bytes(self) -> int:
        """KV memory of the sessions holding device state (all but the suspended)."""
        return sum(self.kv_per_session for s in self.sessions.values() if s.state != "suspended")

    def stats(self, sid: str) -> dict:
        live, now = self._get(sid), self.clock()
        playout = live.playout
        hits = live.executor.stats.hit_rate
        return {
            "id": sid, "state": live.state, "paused": live.paused, "viewers": live.viewers,
            "prompt": live.prompt, "version": live.version, "slack_s": round(playout.slack(now), 3),
            "stalls": playout.stalls, "stall_s": round(playout.stall_s, 3),
            "fidelity_threshold": self.limits.rungs[live.rung], "fidelity_rung": live.rung,
            "fidelity_steps": self.limits.levels[live.rung].steps or self.session.schedule.steps,
            "degraded_blocks": live.degraded_blocks, "cache_hits": None if hits is None else round(hits, 4),
            "fps": round(_rate(live.recent, now), 2), "frames": live.frames,
            "first_frame_s": None if playout.first_at is None else round(playout.first_at - live.opened_at, 3),
            "most_waited_rounds": live.most_waited,
            "video_in": None if live.slot is None or live.slot.video is None else live.slot.video.stats(),
        }  # fmt: skip

    def server_stats(self) -> dict:
        now = self.clock()
        states = Counter(s.state for s in self.sessions.values())
        running = sum(1 for s in self.sessions.values() if s.state != "suspended")
        capacity = self.throughput.sessions(self.fps, self.frames_per_tick, self.limits, most=64,
                                            speedup=self.admission_speedup)  # fmt: skip
        return {
            "sessions_running": states["running"], "sessions_idle": states["idle"],
            "sessions_suspended": states["suspended"], "sessions_paused": sum(s.paused for s in self.sessions.values()),
            "queued": len(self.queue), "refused": self.refused, "expired": self.expired,
            "fps": round(_rate(self.recent, now), 2), "kv_bytes": self.kv_bytes,
            "kv_budget_bytes": self.limits.kv_budget_bytes, "kv_per_session": self.kv_per_session,
            "host_bytes": sum(s.host_bytes for s in self.sessions.values()), "rounds": self.rounds,
            "batch_sizes": dict(sorted(self.batches.items())), "capacity_sessions": capacity,
            "device_sessions": running,
            "round_ms": {k: round(v * 1000, 2) for k, v in sorted(self.throughput.round_s.items())},
        }  # fmt: skip


def _rate(recent: deque, now: float) -> float:
    """Frames per second over the last FPS_WINDOW_S (drops older entries)."""
    while recent and now - recent[0][0] > FPS_WINDOW_S:
        recent.popleft()
    return sum(n for _, n in recent) / FPS_WINDOW_S
