"""A session: one loaded model ready to run streams, and what a run hands back.

`Session(preset, model, prompts, decoder, device, executors)` holds what stays across runs (the
model, prompt K/V, the decoder); `run(prompt, blocks=, seed=)` starts one stream and returns a
`Run`: iterate it for clean latent blocks in order, or `run.frames()` for decoded frames; its
`stats` say what the executor did (forwards, ticks, cache decisions).

A stream may start from given frames (an image, a clip): `encode_start(frames)` makes them clean
latent blocks with the family's own VAE, and `run(..., start=latents)` commits them as the
stream's first blocks (pre-ready blocks that only take their commit pass; SkyReels-V2: its first
segment's clean prefix) before any new block. New blocks are numbered after them; the start is
not yielded again, but `frames()` decodes it first so that a causal decoder continues from it. Which executor parts a
run uses (context, placement, caching, switch) was decided when the session was assembled
(launch/build.py): `executors(noise, blocks_in_forward, ring_frames)` makes one per stream.

Video in: `run(prompt, blocks=, seed=, video_in=frames, strength=S)` starts each block from the
input's next frames, encoded by the session's `encoder` and noised to S (engine/runtime/video_in.py),
on the preset's sequential or pyramid plan; blocks after the input ends start from noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

from engine.config import ConfigError, Preset
from engine.models.vae import to_uint8
from engine.plan.sigmas import Schedule, build_schedule
from engine.plan.skyreels import Segment, plan_segments
from engine.plan.steps import Adjustable
from engine.plan.timeline import Tick, blocks_per_tick, pyramid, sequential
from engine.runtime.executor import Executor
from engine.runtime.outputs import Block, RunStats
from engine.runtime.prompts import Prompts
from engine.runtime.segments import run_segments
from engine.runtime.video_in import Encoder, VideoIn
from engine.sampling.noise import NoiseSource


class ExecutorFactory(Protocol):
    def __call__(self, noise: NoiseSource, *, blocks_in_forward: int, ring_frames: int | None = None) -> Executor:
        """A fresh executor (own KV cache, own part state) for one stream or one segment."""
        ...

    def for_preset(self, preset: Preset) -> ExecutorFactory:
        """The same model and ranks, executors made for another plan / sampling / cache setting."""
        ...


StartEncoder = Callable[[object, np.ndarray, int], torch.Tensor]
"""(the session's decoder, frames `[T, H, W, 3]` uint8, most latent frames) -> clean start
latents (the family's `encode_start` for the preset)."""


class Run:
    """One stream: iterate for clean latent blocks in order; `stats` as of now."""

    def __init__(self, blocks: Iterator[Block], executors: list[Executor], decoder, start: torch.Tensor | None = None):
        self._blocks, self._executors, self._decoder = blocks, executors, decoder
        self.start = start
        """The clean latents the stream started from `[1, C, P * F, h, w]` (None: from noise)."""

    def __iter__(self) -> Iterator[Block]:
        return self._blocks

    def __next__(self) -> Block:
        return next(self._blocks)

    @property
    def kv_bytes(self) -> int:
        """Memory of the run's KV caches."""
        return sum(e.cache.nbytes for e in self._executors if e.cache is not None)

    @property
    def stats(self) -> RunStats:
        total = RunStats()
        for executor in self._executors:
            total = total.merged(executor.stats)
        return total

    def frames(self, include_start: bool = False) -> Iterator[tuple[Block, np.ndarray]]:
        """Each finished block with its decoded frames `[F', H, W, 3]` uint8, in order. A given
        start is decoded first (a causal decoder goes on from it) and, with `include_start`,
        yielded as one block of index 0 (its frames as the VAE gives them back)."""
        self._decoder.reset()
        if self.start is not None:
            given = to_uint8(self._decoder.decode(self.start))
            if include_start:
                yield Block(0, 0, self.start), given
        for block in self._blocks:
            yield block, to_uint8(self._decoder.decode(block.latents))


PER_STEP_SOLVERS = ("self-forcing", "euler")
"""Solvers that read a step's sigmas from its `Work`: a block may then start at any strength."""


class Session:
    def __init__(
        self,
        preset: Preset,
        model,
        prompts: Prompts,
        decoder,
        device: torch.device,
        executors: ExecutorFactory,
        start_encoder: StartEncoder | None = None,
        encoders: Callable[[], Encoder] | None = None,
    ):
        """`start_encoder`: given frames -> a stream's clean start; `encoders()`: a fresh frames ->
        latents encoder of the family's VAE for one stream's video in (None: the family has none)."""
        self.preset, self.model, self.prompts, self.decoder = preset, model, prompts, decoder
        self.device, self.executors = device, executors
        self.start_encoder, self.encoders = start_encoder, encoders
        self.schedule: Schedule = build_schedule(preset.sampling)

    def reconfigured(self, preset: Preset) -> Session:
        """This session's loaded model under another plan, sampling or cache setting (nothing is
        reloaded). The model, text, latent space and stream geometry must stay the same."""
        for part in ("model", "vae", "text", "stream"):
            if getattr(preset, part) != getattr(self.preset, part):
                raise ConfigError(f"{preset.name}: a session can change its plan, sampling or cache, not its {part}")
        prompts = Prompts(preset, self.model, self.prompts.encoder, self.device, self.prompts.embed)
        executors = self.executors.for_preset(preset)
        return Session(preset, self.model, prompts, self.decoder, self.device, executors, self.start_encoder,
                       self.encoders)  # fmt: skip

    def start_capacity(self) -> int:
        """Latent frames of given start a stream keeps (whole blocks): what a new block can see
        of committed context (its window less itself); SkyReels-V2: the segments' overlap."""
        plan, stream = self.preset.plan, self.preset.stream
        frames = plan.overlap_frames if plan.schedule == "skyreels" else stream.context_frames
        return max(frames, stream.frames_per_block) // stream.frames_per_block * stream.frames_per_block

    def encode_start(self, frames: np.ndarray) -> torch.Tensor:
        """Given frames `[T, H, W, 3]` uint8 (an image: T = 1; any size, center-cropped and resized)
        -> the clean latents `[1, C, P * F, h, w]` a stream starts from (the family's VAE)."""
        if self.start_encoder is None:
            raise ConfigError(f"{self.preset.name}: this session cannot start a stream from given frames")
        with torch.no_grad():
            return self.start_encoder(self.decoder, frames, self.start_capacity())

    def plan(self, num_blocks: int | None, pre_ready: int = 0) -> Iterator[Tick]:
        """The preset's sequential or pyramid plan (SkyReels plans are built per segment);
        `pre_ready` clean start blocks take only their commit pass, at tick 0."""
        plan, stream = self.preset.plan, self.preset.stream
        window = stream.window_frames // stream.frames_per_block
        if plan.history_reach is not None:  # a whole-window view must hold every block in reach
            window = max(window, *plan.history_reach, plan.commit_reach)
        if plan.schedule == "sequential":
            return sequential(self.schedule, num_blocks=num_blocks, window_blocks=window, pre_ready=pre_ready)
        return pyramid(self.schedule, offset=plan.offset, num_blocks=num_blocks, window_blocks=window,
                       pre_ready=pre_ready)  # fmt: skip

    def run(
        self,
        prompt: str | Callable[[Tick], str],
        *,
        blocks: int | None,
        seed: int,
        initial: Callable[[int], torch.Tensor] | None = None,
        start: torch.Tensor | None = None,
        video_in: Iterable | None = None,
        strength: float = 1.0,
        wait_s: float | None = None,
    ) -> Run:
        """Start a stream of `blocks` new blocks (None: endless). `prompt` may depend on the tick
        (prompt switches); `initial(b)` overrides block b's starting noise; `start`: clean latents
        (`encode_start`) committed first. `video_in`: input frames (a FrameFeed or an iterator of
        uint8 `[H, W, 3]`), each block noised to `strength`; a feed waits `wait_s` for a block's
        frames before holding the last picture. Bad plans fail here, before any work."""
        prefix = self.start_blocks(start)
        conditioning = self.prompts.conditioning
        text = (lambda tick: conditioning(prompt(tick))) if callable(prompt) else conditioning(prompt)
        noise, executors = NoiseSource(seed), []
        if video_in is not None:
            if prefix:
                raise ConfigError("a stream takes either a given start or video in, not both")
            return self._video_run(text, blocks, noise, self.video_input(video_in, strength, noise, wait_s))

        def make(noise: NoiseSource, blocks_in_forward: int, ring_frames: int | None = None) -> Executor:
            executors.append(self.executors(noise, blocks_in_forward=blocks_in_forward, ring_frames=ring_frames))
            return executors[-1]

        if self.preset.plan.schedule == "skyreels":
            return Run(self._skyreels(make, text, noise, blocks, initial, prefix), executors, self.decoder, start)
        offset = None if self.preset.plan.schedule == "sequential" else self.preset.plan.offset
        total = None if blocks is None else blocks + len(prefix)
        executor = make(noise, blocks_per_tick(self.schedule, offset, total, len(prefix)))
        ticks = self.plan(total, pre_ready=len(prefix))
        return Run(executor.run(ticks, text, initial=initial, prefix=prefix), executors, self.decoder, start)

    def video_input(self, source: Iterable, strength: float, noise: NoiseSource, wait_s: float | None) -> VideoIn:
        """The input part of one stream (its `noise`), or ConfigError saying why this session
        cannot take video in."""
        name, sampling = self.preset.name, self.preset.sampling
        if self.encoders is None:
            raise ConfigError(f"preset {name}: its family has no encoder here, so it cannot take video in")
        if self.preset.plan.schedule not in ("sequential", "pyramid") or sampling.solver not in PER_STEP_SOLVERS:
            raise ConfigError(
                f"preset {name}: video in runs sequential or pyramid plans with a per-step solver "
                f"({', '.join(PER_STEP_SOLVERS)}), not {self.preset.plan.schedule} with {sampling.solver}"
            )
        stream = self.preset.stream

        def pixel_frames(block: int) -> int:
            return self.preset.pixel_frames(block + 1) - self.preset.pixel_frames(block)

        return VideoIn(source, self.encoders(), self.schedule, strength, noise, pixel_frames=pixel_frames,
                       size=(stream.height, stream.width), wait_s=wait_s)  # fmt: skip

    def video_plan(self, blocks: int | None, video: VideoIn) -> Adjustable:
        """The preset's sequential or pyramid plan, each block's schedule chosen by the input."""
        stream, plan = self.preset.stream, self.preset.plan
        offset = None if plan.schedule == "sequential" else plan.offset
        window = stream.window_frames // stream.frames_per_block
        return Adjustable(self.schedule, offset, window, num_blocks=blocks, choose=video.schedule_for)

    def _video_run(self, text, blocks: int | None, noise: NoiseSource, video: VideoIn) -> Run:
        offset = None if self.preset.plan.schedule == "sequential" else self.preset.plan.offset
        executor = self.executors(noise, blocks_in_forward=blocks_per_tick(self.schedule, offset, blocks))
        initial = lambda block: video.initial(block, executor.block_shape, executor.device)  # noqa: E731
        run = Run(executor.run(self.video_plan(blocks, video), text, initial=initial), [executor], self.decoder)
        run.video_in = video
        return run

    def start_blocks(self, start: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """{block: clean latents `[1, C, F, h, w]`} of a given start (blocks 0 .. P-1)."""
        if start is None:
            return {}
        frames = self.preset.stream.frames_per_block
        expected = self.preset.latent_shape(start.shape[2])
        if tuple(start.shape) != expected or not 0 < start.shape[2] <= self.start_capacity() or start.shape[2] % frames:
            raise ConfigError(f"a stream's start must be latents of shape {expected[:2]} x (whole {frames}-frame "
                              f"blocks, at most {self.start_capacity()} frames) x {expected[3:]}, got "
                              f"{tuple(start.shape)}: make it with encode_start")  # fmt: skip
        return {b: start[:, :, b * frames : (b + 1) * frames] for b in range(start.shape[2] // frames)}

    def _skyreels(self, make, text, noise: NoiseSource, blocks: int | None, initial, prefix) -> Iterator[Block]:
        if blocks is None:
            raise ConfigError("the skyreels schedule makes finite videos: give a number of blocks")
        frames, plan = self.preset.stream.frames_per_block, self.preset.plan
        given = len(prefix) * frames
        segments = plan_segments(given + blocks * frames, plan.segment_frames, plan.overlap_frames, frames, given)

        def segment_executor(segment: Segment) -> Executor:
            segment_blocks = segment.frames // frames
            in_forward = blocks_per_tick(self.schedule, plan.offset, segment_blocks, segment.prefix_frames // frames)
            return make(noise.fork(segment.index), in_forward, segment.frames)

        return run_segments(segments, segment_executor, text, offset=plan.offset, block_frames=frames, initial=initial,
                            history=prefix)  # fmt: skip
