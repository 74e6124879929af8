"""Run any plan on one device: one forward per tick, blocks side by side along the frame axis.

Per tick: gather the inputs of the blocks in the forward (each frame at its own noise level), run
the denoiser once (cond and uncond batched when guided), apply each working block's solver, write
committed blocks' clean K/V, and yield blocks the moment they finish, in order.

Two ways to choose what goes into the forward:
* `selective` (SCOPE-style selective computation): only blocks with work this tick. Finished
  blocks are seen through their committed K/V; blocks that have not started are not run.
* `window` (what SkyReels-V2's pipelines do): every block of the tick's window, each tick:
  finished blocks at the commit level (t = 0), unstarted blocks as pure noise at `noise_t`,
  no KV cache. This is the reference the selective mode is measured against.
With causal attention among blocks the two give the same result; with bidirectional attention
(SkyReels-V2's released weights) selective is an approximation (launch/bench.py measures it).

Rules for this file: no model math, no host syncs in the per-tick path, plain per-block state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from engine.models.rope import Rope
from engine.models.wan import TextKV, WanModel
from engine.plan.sigmas import TRAIN_TIMESTEPS, Schedule
from engine.plan.timeline import Tick, Work
from engine.runtime.kv import AttentionView, KVCache, LocalView
from engine.sampling.guidance import ClassifierFree, Guidance
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import Solver

PREFIX_NOISE_STEP = 1_000_000  # noise stream of re-noised clean prefixes: (block, PREFIX_NOISE_STEP + tick)


@dataclass
class Block:
    """A finished block: index, first latent frame, clean latents `[B, C, F, H, W]` (float32)."""

    index: int
    first_frame: int
    latents: torch.Tensor


@dataclass
class ExecutorStats:
    forwards: int = 0
    frames: int = 0
    """Latent frames run through the model (per branch), summed over forwards."""
    calls: Counter[tuple[int, int]] = field(default_factory=Counter)
    """How many forwards ran with each (query frames, key frames): what their cost depends on.
    A count per shape, so an endless stream's statistics stay bounded."""


class Executor:
    """Runs plans on one device for one stream."""

    def __init__(
        self,
        model: WanModel,
        *,
        schedule: Schedule,
        solver: Solver,
        noise: NoiseSource,
        block_shape: tuple[int, ...],
        rope: Rope,
        attention: str = "causal",
        compute: str = "selective",
        cache: KVCache | None = None,
        guidance_scale: float = 1.0,
        fps: int | None = None,
        prefix_noise_t: float = 0.0,
        guidance: Guidance | None = None,
        history_reach: tuple[int, ...] | None = None,
        commit_reach: int = 1,
    ):
        if compute == "selective" and cache is None:
            raise ValueError("selective computation needs a KV cache")
        self.model, self.schedule, self.solver, self.noise = model, schedule, solver, noise
        self.block_shape = tuple(block_shape)  # [B, C, F, H, W] of one block
        self.frames_per_block = block_shape[2]
        self.rope, self.attention, self.compute, self.cache = rope, attention, compute, cache
        self.fps, self.prefix_noise_t = fps, prefix_noise_t
        self.guidance = guidance or ClassifierFree(guidance_scale)
        self.history_reach, self.commit_reach = history_reach, commit_reach
        self.noisy: dict[int, torch.Tensor] = {}  # started (or, in window mode, waiting) blocks
        self.clean: dict[int, torch.Tensor] = {}  # finished blocks not yet committed / still in view
        self.pre_ready: set[int] = set()
        self.stats = ExecutorStats()
        self._initial: Callable[[int], torch.Tensor] = self._noise_block

    @property
    def device(self) -> torch.device:
        return self.rope.device

    def _noise_block(self, block: int) -> torch.Tensor:
        return self.noise.noise(self.block_shape, block, 0, self.device)

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        ticks: Iterable[Tick],
        text: TextKV | Callable[[Tick], TextKV],
        *,
        initial: Callable[[int], torch.Tensor] | None = None,
        prefix: dict[int, torch.Tensor] | None = None,
    ) -> Iterator[Block]:
        """Execute `ticks`; yield each block once its last step is done.

        `text`: the prompt's K/V (batch 2 = [cond, uncond] when guided), or a function of the tick
        (a prompt switch takes effect at the next tick). `initial(b)`: block b's starting noise
        (default: the stream's noise for (b, 0)). `prefix`: clean latents of pre-ready blocks.
        """
        self.start(initial=initial, prefix=prefix)
        for tick in ticks:
            yield from self.step(tick, self._text_for(tick, text(tick) if callable(text) else text))

    def _text_for(self, tick: Tick, requested: TextKV) -> TextKV:
        """The prompt a tick runs under: the one requested for it (the next step takes it)."""
        return requested

    def start(
        self, *, initial: Callable[[int], torch.Tensor] | None = None, prefix: dict[int, torch.Tensor] | None = None
    ) -> None:
        """Set the starting noise and the clean prefix before the first tick."""
        self._initial = initial or self._noise_block
        for block, latents in (prefix or {}).items():
            self.clean[block] = latents.to(self.device, torch.float32)
            self.pre_ready.add(block)

    def step(self, tick: Tick, text: TextKV) -> list[Block]:
        """Run one tick; the blocks whose last step it was, in order."""
        return list(self._run_tick(tick, text))

    def owns(self, block: int) -> bool:
        """Whether this executor denoises `block` (all of them here; one rank's share in a cascade)."""
        return True

    def _run_tick(self, tick: Tick, text: TextKV) -> Iterator[Block]:
        flows = self._compute(tick, text)
        yield from self._apply(tick, flows)
        self._forget(tick)

    def _compute(self, tick: Tick, text: TextKV) -> dict[int, torch.Tensor]:
        """Flows of the tick's working blocks: here one forward over all of them (joint context)."""
        selective = self.compute == "selective"
        members = self._selective_members(tick) if selective else self._window_members(tick)
        context_frames = self.cache.visible_frames if selective else 0
        flows = self._forward(members, text, self._view(tick, members[0][0], len(members) * self.frames_per_block))
        self._count(len(members), context_frames)
        return flows

    def _count(self, blocks: int, context_frames: int) -> None:
        frames = blocks * self.frames_per_block
        self.stats.forwards += 1
        self.stats.frames += frames
        self.stats.calls[(frames, context_frames + frames)] += 1

    def _view(self, tick: Tick, first_block: int, frames: int) -> AttentionView:
        first_frame, block_frames = first_block * self.frames_per_block, self.frames_per_block
        blocks = range(first_block, first_block + frames // block_frames)
        reach = self.reach(tick, blocks)
        if self.compute == "window":
            return LocalView(self.rope, first_frame, frames, block_frames, self.attention, reach)
        commits = sum(1 for w in tick.work if w.commit)
        return self.cache.view(
            first_frame=first_frame,
            frames=frames,
            block_frames=block_frames,
            mode=self.attention,
            commit_frames=commits * block_frames,
            reach=reach,
        )

    def reach(self, tick: Tick, blocks: Iterable[int]) -> dict[int, int] | None:
        """How many blocks back (itself included) each block of a forward attends to, or None for
        the whole window. With `history_reach` (MAGI-1) a denoising block's reach depends on its
        stage; committing and already clean blocks see `commit_reach` blocks."""
        if self.history_reach is None:
            return None
        per_stage = self.schedule.steps // len(self.history_reach)
        work = {w.block: w for w in tick.work if not w.commit}
        return {b: self.history_reach[work[b].step // per_stage] if b in work else self.commit_reach for b in blocks}

    # -- choosing the inputs -------------------------------------------------------------------

    def _selective_members(self, tick: Tick) -> list[tuple[int, torch.Tensor, float]]:
        """(block, input latents, network time) of the tick's blocks this executor owns."""
        self._check_selective(tick)
        return [self._input(w, tick) for w in tick.work if self.owns(w.block)]

    @staticmethod
    def _check_selective(tick: Tick) -> None:
        blocks = tick.blocks
        if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
            raise ValueError(f"tick {tick.index}: blocks with work must be consecutive, got {blocks}")
        seen_work = False
        for w in tick.work:
            seen_work |= not w.commit
            if w.commit and seen_work:
                raise ValueError(f"tick {tick.index}: committing blocks must precede working ones")

    def _window_members(self, tick: Tick) -> list[tuple[int, torch.Tensor, float]]:
        start, end = tick.window
        work = {w.block: w for w in tick.work if not w.commit}
        outside = [b for b in work if not start <= b < end]
        if outside:
            raise ValueError(f"tick {tick.index}: blocks {outside} have work outside the window {tick.window}")
        members = []
        for block in range(start, end):
            if block in work:
                members.append(self._input(work[block], tick))
            elif block in self.clean:
                members.append(self._clean_input(block, tick))
            else:  # not started yet: its initial noise, told it is pure noise
                latents = self.noisy.setdefault(block, self._initial(block))
                members.append((block, latents, self.schedule.noise_t))
        return members

    def _input(self, work: Work, tick: Tick) -> tuple[int, torch.Tensor, float]:
        if work.commit:
            return self._clean_input(work.block, tick)
        if work.block not in self.noisy:
            self.noisy[work.block] = self._initial(work.block)
        return work.block, self.noisy[work.block], work.t_in

    def _clean_input(self, block: int, tick: Tick) -> tuple[int, torch.Tensor, float]:
        latents = self.clean[block]
        if block in self.pre_ready and self.prefix_noise_t > 0:
            # SkyReels-V2's addnoise_condition: put a little noise back on the clean prefix
            share = self.prefix_noise_t / TRAIN_TIMESTEPS
            fresh = self.noise.noise(self.block_shape, block, PREFIX_NOISE_STEP + tick.index, self.device)
            return block, latents * (1.0 - share) + fresh * share, self.prefix_noise_t
        return block, latents, self.schedule.commit_t

    # -- the forward ---------------------------------------------------------------------------

    def _forward(self, members, text, view: AttentionView) -> dict[int, torch.Tensor]:
        x = torch.cat([latents for _, latents, _ in members], dim=2)  # [B, C, frames, H, W]
        with torch.no_grad():
            flow = self.guidance(self, members, x, self._sigma(members), text, view)
        split = flow.split([latents.shape[2] for _, latents, _ in members], dim=2)
        return {block: part for (block, _, _), part in zip(members, split)}

    def _sigma(self, members) -> torch.Tensor:
        """`[1, frames]` float64 noise levels of the members' frames. float64 keeps the network's
        t = 1000 * sigma exact (SkyReels feeds integer t); filled on the device, so no host-to-device
        copy waits on the stream."""
        return torch.cat(
            [
                torch.full((latents.shape[2],), t_in / TRAIN_TIMESTEPS, dtype=torch.float64, device=self.device)
                for _, latents, t_in in members
            ]
        )[None]

    def _apply(self, tick: Tick, flows: dict[int, torch.Tensor]) -> Iterator[Block]:
        for work in tick.work:
            if work.commit or not self.owns(work.block):
                continue
            latents = self.solver.step(work, self.noisy[work.block], flows[work.block])
            if work.step + 1 < self.schedule.steps:
                self.noisy[work.block] = latents
                continue
            del self.noisy[work.block]
            self.solver.release(work.block)
            self.clean[work.block] = latents
            yield Block(work.block, work.block * self.frames_per_block, latents)

    def _forget(self, tick: Tick) -> None:
        """Drop clean latents nothing will read again."""
        if self.compute == "selective":
            for work in tick.work:
                if work.commit:
                    self.clean.pop(work.block, None)
        else:
            for block in [b for b in self.clean if b < tick.window[0]]:
                del self.clean[block]
