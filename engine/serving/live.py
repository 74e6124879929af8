"""One endless stream: a seed, a prompt viewers may change, frames handed out as blocks finish.

`LiveStream.run()` drives the pipeline's plan forever (every rank runs it). What viewers ask for
(prompt, pause, stop) lands in `Controls` on the serving rank; at every tick the serving rank
broadcasts it to all ranks, so every rank switches prompts, pauses and stops at the same tick.
A prompt takes effect at the next tick (for a cascade: at the in-flight blocks' next step).

Stats: FPS over the last seconds, time to first frame, and the last switch latency, from the
switch request to the first frame whose block finished its last step under the new prompt.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.models.vae import to_uint8
from engine.plan.timeline import Tick
from engine.runtime.executor import Block
from engine.serving.protocol import MAX_PROMPT_CHARS
from parallel.topology import Topology

PAUSE_POLL_S = 0.05
FPS_WINDOW_S = 3.0
_PACKET_BYTES = 8 + 4 * MAX_PROMPT_CHARS  # flags, version, length, UTF-8 prompt


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


class Controls:
    """What viewers asked for; thread-safe; read by the engine once per tick."""

    def __init__(self, prompt: str):
        self._lock = threading.Lock()
        self.prompt, self.version, self.paused, self.stopped = prompt, 0, False, False
        self.requested_at: dict[int, float] = {}

    def request_prompt(self, text: str) -> int:
        with self._lock:
            self.version += 1
            self.prompt = text
            self.requested_at[self.version] = time.perf_counter()
            return self.version

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            self.paused = paused

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def snapshot(self) -> tuple[str, int, bool, bool]:
        with self._lock:
            return self.prompt, self.version, self.paused, self.stopped

    def settle(self, version: int) -> float | None:
        """When prompt `version` was requested (None if already settled); forgets older requests."""
        with self._lock:
            requested = self.requested_at.get(version)
            self.requested_at = {v: t for v, t in self.requested_at.items() if v > version}
            return requested


def _pack(prompt: str, version: int, paused: bool, stopped: bool) -> torch.Tensor:
    data = prompt.encode("utf-8")
    packet = torch.zeros(_PACKET_BYTES, dtype=torch.uint8)
    header = np.array([int(paused) | 2 * int(stopped), version, len(data)], dtype=np.uint32).view(np.uint8)
    packet[: header.size] = torch.from_numpy(header.copy())
    packet[header.size : header.size + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return packet


def _unpack(packet: torch.Tensor) -> tuple[str, int, bool, bool]:
    flags, version, length = np.frombuffer(packet[:12].numpy().tobytes(), dtype=np.uint32)
    prompt = bytes(packet[12 : 12 + int(length)].tolist()).decode("utf-8")
    return prompt, int(version), bool(flags & 1), bool(flags & 2)


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
        topology: Topology,
        *,
        steps: int,
        fps: int,
        pace: bool,
        on_frames: Callable,
        cache_hits: Callable[[], float | None] = lambda: None,
    ):
        self.source, self.decoder, self.controls, self.topology = source, decoder, controls, topology
        self.steps, self.fps, self.pace, self.on_frames = steps, fps, pace, on_frames
        self.cache_hits = cache_hits
        self.stats = Stats(prompt=controls.prompt, ranks=topology.world_size, stream_fps=fps)
        self._state = controls.snapshot()
        self._last_step_version: dict[int, int] = {}  # block -> prompt version of its last step
        self._recent: deque[tuple[float, int]] = deque()
        self._started = 0.0

    # -- control, once per tick, on every rank -------------------------------------------------

    def sync(self) -> tuple[str, int, bool, bool]:
        """The serving rank's controls, on every rank."""
        state = self.controls.snapshot() if self.topology.is_decoder else None
        if self.topology.distributed:
            packet = _pack(*state) if state is not None else torch.zeros(_PACKET_BYTES, dtype=torch.uint8)
            dist.broadcast(packet, src=self.topology.sink)
            state = _unpack(packet)
        return state

    def _prompt_for(self, tick: Tick) -> str:
        state = self.sync()
        while state[2] and not state[3]:  # paused: keep ticking the controls, not the model
            self.stats.paused = True
            time.sleep(PAUSE_POLL_S)
            state = self.sync()
        self.stats.paused = False
        if state[3]:
            raise StopStream()
        self._state = state
        for work in tick.work:
            if work.step == self.steps - 1:
                self._last_step_version[work.block] = state[1]
        return state[0]

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
        first_index = self.stats.frames
        self.on_frames(frames, first_index, version, elapsed)
        stats = self.stats
        stats.frames += len(frames)
        stats.prompt, stats.version = self._state[0], self._state[1]
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
        if self.pace:  # a live stream runs no faster than it plays
            ahead = stats.frames / self.fps - (time.perf_counter() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def snapshot(self) -> dict:
        return asdict(self.stats)
