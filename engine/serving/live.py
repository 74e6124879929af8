"""One endless stream: a seed, a prompt viewers may change, frames handed out as blocks finish.

`LiveStream.run()` drives the pipeline's plan forever (every rank runs it). What viewers ask for
(prompt, pause, stop) lands in `Controls` on the serving rank; at every tick the serving rank
shares it with all ranks (engine/serving/controls.py), so every rank switches prompts, pauses and
stops at the same tick. A prompt takes effect at the next tick (for a cascade: at the in-flight
blocks' next step).

Stats: FPS over the last seconds, time to first frame, and the last switch latency, from the
switch request to the first frame whose block finished its last step under the new prompt.

Many sessions (the server's default) are driven differently: a `SessionDesk` owns one session
manager (engine/serving/sessions.py) and, in one thread, applies the server's queued `Request`s
and runs one scheduling round per `cycle`, handing back plain data (`Cycle`) that a replica on
another rank can ship (engine/serving/replicas.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from typing import Protocol

import numpy as np
import torch

from engine.models.vae import to_uint8
from engine.plan.timeline import Tick
from engine.runtime.executor import Block
from engine.serving.controls import Controls, ControlState, OneProcess, Ranks, share
from engine.serving.sessions import SessionError

__all__ = ["Controls", "Cycle", "LiveStream", "OneProcess", "Playout", "Request", "SessionDesk", "Stats", "StopStream"]

PAUSE_POLL_S = 0.05
FPS_WINDOW_S = 3.0


class StopStream(Exception):
    """Raised inside the plan when the stream is asked to stop."""


@dataclass
class Stats:
    prompt: str = ""
    version: int = 0
    paused: bool = False
    frames: int = 0
    fps: float = 0.0
    first_frame_s: float | None = None
    last_switch_s: float | None = None
    ranks: int = 1
    stream_fps: int = 16
    """Playback rate of the video."""
    cache_hits: float | None = None
    """Share of block computations a feature cache skipped (None without a cache)."""


class Playout:
    """Paces a live stream to its playback rate: after a block of n frames leaves, the next may
    leave n/fps later. Time lost (a pause, a slow block) is made up by at most one block: a
    stream further behind its schedule forgets the rest rather than bursting to catch up, which
    would only overflow the viewers' queues."""

    def __init__(self, fps: int):
        self.fps = fps
        self.end: float | None = None  # when the last block finishes playing, on schedule

    def wait_after(self, frames: int, now: float) -> float:
        """Seconds to wait after a block of `frames` frames left at `now`."""
        duration = frames / self.fps
        start = now if self.end is None else max(self.end, now - duration)
        self.end = start + duration
        return max(self.end - now, 0.0)


BlockSource = Callable[[Callable[[Tick], str]], Iterator[Block]]


class LiveStream:
    """Runs one stream until stopped; `on_frames(frames, first_index, version, seconds)` on the sink.

    `source(prompt_for)` yields finished blocks: the pipeline's endless plan on compute ranks, the
    receiving loop on a dedicated decode rank; both call `prompt_for(tick)` once per tick.
    """

    def __init__(
        self,
        source: BlockSource,
        decoder,
        controls: Controls,
        ranks: Ranks | None = None,
        *,
        steps: int,
        fps: int,
        pace: bool,
        on_frames: Callable,
        cache_hits: Callable[[], float | None] = lambda: None,
    ):
        self.source, self.decoder, self.controls = source, decoder, controls
        self.ranks = ranks if ranks is not None else OneProcess()
        self.steps, self.fps, self.pace, self.on_frames = steps, fps, pace, on_frames
        self.cache_hits = cache_hits
        self.stats = Stats(prompt=controls.prompt, ranks=self.ranks.world_size, stream_fps=fps)
        self.playout = Playout(fps)
        self._state = controls.snapshot()
        self._last_step_version: dict[int, int] = {}  # block -> prompt version of its last step
        self._recent: deque[tuple[float, int]] = deque()
        self._started = 0.0

    # -- control, once per tick, on every rank -------------------------------------------------

    def sync(self) -> ControlState:
        """The serving rank's controls, on every rank."""
        return share(self.controls, self.ranks)

    def _prompt_for(self, tick: Tick) -> str:
        state = self.sync()
        while state.paused and not state.stopped:  # paused: keep ticking the controls, not the model
            self.stats.paused = True
            time.sleep(PAUSE_POLL_S)
            state = self.sync()
        self.stats.paused = False
        if state.stopped:
            raise StopStream()
        self._state = state
        self.controls.running(state.version)
        for work in tick.work:
            if work.step == self.steps - 1:
                self._last_step_version[work.block] = state.version
        return state.prompt

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self._started = time.perf_counter()
        self.decoder.reset()
        blocks = self.source(self._prompt_for)
        try:
            for block in blocks:
                frames = to_uint8(self.decoder.decode(block.latents))
                version = self._last_step_version.pop(block.index, 0)
                self._emit(frames, version)
        except StopStream:
            pass
        finally:
            blocks.close()

    def _emit(self, frames: np.ndarray, version: int) -> None:
        now = time.perf_counter()
        elapsed = now - self._started
        self.on_frames(frames, self.stats.frames, version, elapsed)
        self._count(frames, version, now, elapsed)
        if self.pace:  # a live stream runs no faster than it plays
            wait = self.playout.wait_after(len(frames), now)
            if wait > 0:
                time.sleep(wait)

    def _count(self, frames: np.ndarray, version: int, now: float, elapsed: float) -> None:
        stats = self.stats
        stats.frames += len(frames)
        stats.prompt, stats.version = self._state.prompt, self._state.version
        stats.cache_hits = self.cache_hits()
        stats.first_frame_s = stats.first_frame_s if stats.first_frame_s is not None else elapsed
        requested = self.controls.settle(version)
        if requested is not None:
            stats.last_switch_s = now - requested
        self._recent.append((now, len(frames)))
        while self._recent and now - self._recent[0][0] > FPS_WINDOW_S:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        stats.fps = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        return asdict(self.stats)


# -- many sessions: one manager, driven by one thread ----------------------------------------------

SESSION_OPS = ("open", "join", "set_prompt", "pause", "resume", "viewer_left", "viewer_returned", "close",
               "start_from", "video_in")  # fmt: skip
"""What the server may ask of a session manager (engine/serving/sessions.py); nothing else is called.
`video_in` hands over a live source object: only a replica in the serving process takes it."""


class SessionHost(Protocol):
    """A session manager as the server drives it. Every call comes from one thread (the desk's)."""

    def open(self, prompt: str, seed: int): ...
    def round(self) -> dict: ...
    def stats(self, session_id: str): ...
    def server_stats(self): ...


@dataclass(frozen=True)
class Request:
    """One call the server wants made on a manager: `op` of SESSION_OPS with JSON-able `args`."""

    ticket: int
    op: str
    args: tuple


@dataclass
class Cycle:
    """What one pass of a desk gives back: answers to requests, frames, stats (all plain data, so
    that a replica on another rank can ship it)."""

    answers: dict[int, dict]
    """ticket -> {"ok": plain answer} or {"error": one line}"""
    blocks: dict[str, list[np.ndarray]]
    """session -> finished blocks' frames, each `[F, H, W, 3]` uint8, in order"""
    versions: dict[str, list[int]]
    """session -> for each of its blocks, the prompt version in force when it finished"""
    stats: dict[str, dict] | None = None
    """session -> its stats (None: not refreshed this cycle)"""
    server: dict | None = None
    gone: tuple[str, ...] = ()
    """sessions the manager no longer knows (expired, closed)"""


def plain(value) -> object:
    """A manager's answer or stats as JSON-able data (dataclasses and named tuples become dicts)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {"kind": type(value).__name__, **{k: plain(v) for k, v in asdict(value).items()}}
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class SessionDesk:
    """Runs one manager: the requests that queued since the last pass, then one scheduling round.

    The manager is not shared between threads: whoever owns the desk calls `cycle` and nothing
    else touches the manager. Each block carries the prompt version it finished under: the
    manager's (`round_blocks`), or for a manager with only `round()`, the versions counted here
    (a round runs after every switch asked before it).
    """

    def __init__(self, manager: SessionHost, stats_every_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.manager, self.stats_every_s, self.clock = manager, stats_every_s, clock
        self.versions: dict[str, int] = {}
        self._stats_at = -float("inf")

    def cycle(self, requests: list[Request]) -> Cycle:
        with torch.no_grad():  # grad mode is per thread: a desk's thread must say it too
            answers = {request.ticket: self._answer(request) for request in requests}
            cycle = Cycle(answers, *self._round())
        now = self.clock()
        if now - self._stats_at >= self.stats_every_s or requests:
            self._stats_at = now
            cycle.stats, cycle.gone = self._session_stats()
            cycle.server = plain(self.manager.server_stats())
        return cycle

    def _round(self) -> tuple[dict[str, list[np.ndarray]], dict[str, list[int]]]:
        if hasattr(self.manager, "round_blocks"):  # blocks that say their own prompt version
            out = {str(s): list(chunks) for s, chunks in self.manager.round_blocks().items() if len(chunks)}
            return {s: [c.pixels for c in chunks] for s, chunks in out.items()}, {
                s: [c.version for c in chunks] for s, chunks in out.items()
            }
        blocks = {str(s): list(v) for s, v in self.manager.round().items() if len(v)}
        return blocks, {s: [self.versions.get(s, 0)] * len(v) for s, v in blocks.items()}

    def _answer(self, request: Request) -> dict:
        if request.op not in SESSION_OPS or not hasattr(self.manager, request.op):
            return {"error": f"unknown operation {request.op!r}"}
        try:
            answer = plain(getattr(self.manager, request.op)(*request.args))
        except (KeyError, ValueError, LookupError) as err:  # an unknown or ended session, a bad value
            return {"error": str(err.args[0]) if err.args else type(err).__name__}
        if request.op == "open" and isinstance(answer, dict) and "id" in answer:
            self.versions[str(answer["id"])] = 0
        if request.op == "set_prompt":  # the manager's version if it counts them, else ours
            session = str(request.args[0])
            self.versions[session] = answer if isinstance(answer, int) else self.versions.get(session, 0) + 1
            answer = {"version": self.versions[session]}
        return {"ok": answer}

    def _session_stats(self) -> tuple[dict[str, dict], tuple[str, ...]]:
        stats, gone = {}, []
        for session in list(self.versions):
            try:
                stats[session] = plain(self.manager.stats(session))
            except (LookupError, SessionError):  # freed since the last pass (a fake host raises KeyError)
                gone.append(session)
                del self.versions[session]
        return stats, tuple(gone)
