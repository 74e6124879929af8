"""A session: one loaded model ready to run streams, and what a run hands back.

`Session(preset, model, prompts, decoder, device, executors)` holds what stays across runs (the
model, prompt K/V, the decoder); `run(prompt, blocks=, seed=)` starts one stream and returns a
`Run`: iterate it for clean latent blocks in order, or `run.frames()` for decoded frames; its
`stats` say what the executor did (forwards, ticks, cache decisions). Which executor parts a
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


class Run:
    """One stream: iterate for clean latent blocks in order; `stats` as of now."""

    def __init__(self, blocks: Iterator[Block], executors: list[Executor], decoder):
        self._blocks, self._executors, self._decoder = blocks, executors, decoder

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

    def frames(self) -> Iterator[tuple[Block, np.ndarray]]:
        """Each finished block with its decoded frames `[F', H, W, 3]` uint8, in order."""
        self._decoder.reset()
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
        encoders: Callable[[], Encoder] | None = None,
    ):
        """`encoders()`: a fresh frames -> latents encoder of the family's VAE for one stream's video
        in (None: the family has none here)."""
        self.preset, self.model, self.prompts, self.decoder = preset, model, prompts, decoder
        self.device, self.executors, self.encoders = device, executors, encoders
        self.schedule: Schedule = build_schedule(preset.sampling)

    def reconfigured(self, preset: Preset) -> Session:
        """This session's loaded model under another plan, sampling or cache setting (nothing is
        reloaded). The model, text, latent space and stream geometry must stay the same."""
        for part in ("model", "vae", "text", "stream"):
            if getattr(preset, part) != getattr(self.preset, part):
                raise ConfigError(f"{preset.name}: a session can change its plan, sampling or cache, not its {part}")
        prompts = Prompts(preset, self.model, self.prompts.encoder, self.device, self.prompts.embed)
        executors = self.executors.for_preset(preset)
        return Session(preset, self.model, prompts, self.decoder, self.device, executors, self.encoders)

    def plan(self, num_blocks: int | None) -> Iterator[Tick]:
        """The preset's sequential or pyramid plan (SkyReels plans are built per segment)."""
        plan, stream = self.preset.plan, self.preset.stream
        window = stream.window_frames // stream.frames_per_block
        if plan.history_reach is not None:  # a whole-window view must hold every block in reach
            window = max(window, *plan.history_reach, plan.commit_reach)
        if plan.schedule == "sequential":
            return sequential(self.schedule, num_blocks=num_blocks, window_blocks=window)
        return pyramid(self.schedule, offset=plan.offset, num_blocks=num_blocks, window_blocks=window)

    def run(
        self,
        prompt: str | Callable[[Tick], str],
        *,
        blocks: int | None,
        seed: int,
        initial: Callable[[int], torch.Tensor] | None = None,
        video_in: Iterable | None = None,
        strength: float = 1.0,
        wait_s: float | None = None,
    ) -> Run:
        """Start a stream of `blocks` blocks (None: endless). `prompt` may depend on the tick (prompt
        switches); `initial(b)` overrides block b's starting noise. `video_in`: input frames (a
        FrameFeed or an iterator of uint8 `[H, W, 3]`), each block noised to `strength`; a feed
        waits `wait_s` for a block's frames before holding the last picture. Bad plans fail here,
        before any work."""
        conditioning = self.prompts.conditioning
        text = (lambda tick: conditioning(prompt(tick))) if callable(prompt) else conditioning(prompt)
        noise, executors = NoiseSource(seed), []
        if video_in is not None:
            return self._video_run(text, blocks, noise, self.video_input(video_in, strength, noise, wait_s))

        def make(noise: NoiseSource, blocks_in_forward: int, ring_frames: int | None = None) -> Executor:
            executors.append(self.executors(noise, blocks_in_forward=blocks_in_forward, ring_frames=ring_frames))
            return executors[-1]

        if self.preset.plan.schedule == "skyreels":
            return Run(self._skyreels(make, text, noise, blocks, initial), executors, self.decoder)
        offset = None if self.preset.plan.schedule == "sequential" else self.preset.plan.offset
        executor = make(noise, blocks_per_tick(self.schedule, offset, blocks))
        return Run(executor.run(self.plan(blocks), text, initial=initial), executors, self.decoder)

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

    def _skyreels(self, make, text, noise: NoiseSource, blocks: int | None, initial) -> Iterator[Block]:
        if blocks is None:
            raise ConfigError("the skyreels schedule makes finite videos: give a number of blocks")
        frames, plan = self.preset.stream.frames_per_block, self.preset.plan
        segments = plan_segments(blocks * frames, plan.segment_frames, plan.overlap_frames, frames)

        def segment_executor(segment: Segment) -> Executor:
            segment_blocks = segment.frames // frames
            in_forward = blocks_per_tick(self.schedule, plan.offset, segment_blocks, segment.prefix_frames // frames)
            return make(noise.fork(segment.index), in_forward, segment.frames)

        return run_segments(segments, segment_executor, text, offset=plan.offset, block_frames=frames, initial=initial)
