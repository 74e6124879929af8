"""One endless stream: a seed, a prompt viewers may change, frames handed out as blocks finish.

`LiveStream.run()` drives the pipeline's plan forever (every rank runs it). What viewers ask for
(prompt, pause, stop) lands in `Controls` on the serving rank; at every tick the serving rank
shares it with all ranks (engine/serving/controls.py), so every rank switches prompts, pauses and
stops at the same tick. A prompt takes effect at the next tick (for a cascade: at the in-flight
blocks' next step).

Stats: FPS over the last seconds, time to first frame, and the last switch latency, from the
switch request to the first frame whose block finished its last step under the new prompt.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from engine.models.vae import to_uint8
from engine.plan.timeline import Tick
from engine.runtime.executor import Block
from engine.serving.controls import Controls, ControlState, OneProcess, Ranks, share

__all__ = ["Controls", "LiveStream", "OneProcess", "Playout", "Stats", "StopStream"]

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
