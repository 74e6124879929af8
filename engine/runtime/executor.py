"""The one tick loop: run any plan for one stream, its behaviour composed from parts.

Per tick: settle (lagged context takes in last tick's K/V) -> the prompt the tick runs under
(switch part) -> the tick's members this process computes (placement) -> which of them run
(skip part) -> the forward(s) (context part: one joint forward, or one per block with lagged
K/V) -> each working block's solver step -> finished blocks out, in order (placement delivers
them where the output is).

    Executor(model, setup, cache, Parts(context=Lagged(), placement=cascade_rank, skip=cache_skip))

Two ways to choose what goes into the forward (`setup.compute`):
* `selective` (SCOPE-style selective computation): only blocks with work this tick. Finished
  blocks are seen through their committed K/V; blocks that have not started are not run.
* `window` (what SkyReels-V2's pipelines do): every block of the tick's window, each tick:
  finished blocks at the commit level (t = 0), unstarted blocks as pure noise at `noise_t`,
  no KV cache. The reference the selective mode is measured against; it takes no other parts.

Rules for this file: no model math, no host syncs in the per-tick path, plain per-block state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from engine.models.attention import LocalView
from engine.plan.sigmas import TRAIN_TIMESTEPS, Schedule
from engine.plan.timeline import Tick, Work
from engine.runtime.context import Joint, Lagged
from engine.runtime.kv import KVCache
from engine.runtime.offload import relocate
from engine.runtime.outputs import Block, BlockKV, RunStats
from engine.runtime.placement import Local, Placement
from engine.runtime.skip import Member, NoSkip, Skip
from engine.runtime.switch import NextStep, Recache
from engine.sampling.guidance import ClassifierFree, Guidance
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import Solver

PREFIX_NOISE_STEP = 1_000_000  # noise stream of re-noised clean prefixes: (block, PREFIX_NOISE_STEP + tick)


@dataclass(frozen=True, kw_only=True)
class StreamSetup:
    """What the loop needs besides the model and its parts: one stream's sampling and geometry."""

    schedule: Schedule
    solver: Solver
    noise: NoiseSource
    block_shape: tuple[int, ...]
    """[B, C, F, H, W] of one block."""
    rope: object
    """The model family's rotary tables (engine.models.rope / magi_rope)."""
    guidance: Guidance = field(default_factory=ClassifierFree)
    attention: str = "causal"
    compute: str = "selective"
    fps: int | None = None
    """Passed to models with an fps embedding (SkyReels-V2); None otherwise."""
    prefix_noise_t: float = 0.0
    """SkyReels-V2's addnoise_condition: noise put back on a clean prefix (0-1000 units)."""
    history_reach: tuple[int, ...] | None = None
    commit_reach: int = 1


@dataclass
class Prepared:
    """One tick of one stream, stopped before its forward (see `Executor.prepare`)."""

    tick: Tick
    text: object
    run: list[Member] = field(default_factory=list)
    """The members the forward computes, in order."""
    view: object | None = None
    """Joint context: the forward's attention view (the caller runs the forward; `finish` keeps
    and commits through it). None when `prepare` ran the tick's forwards itself."""
    flows: dict[int, torch.Tensor] = field(default_factory=dict)
    """{block: flow} of the computed members, once the forward has run."""


@dataclass
class Parts:
    """The executor's behaviour: one choice per axis, each a small object with its own state."""

    context: Joint | Lagged = field(default_factory=Joint)
    placement: Placement = field(default_factory=Local)
    skip: Skip = field(default_factory=NoSkip)
    switch: NextStep | Recache = field(default_factory=NextStep)


class Executor:
    """Runs plans for one stream (on this process, or its share of a cascade)."""

    def __init__(self, model, setup: StreamSetup, cache: KVCache | None, parts: Parts | None = None):
        parts = parts or Parts()
        if setup.compute == "selective" and cache is None:
            raise ValueError("selective computation needs a KV cache")
        plain = (Joint, Local, NoSkip, NextStep)
        if setup.compute == "window" and not all(map(isinstance, vars(parts).values(), plain)):
            raise ValueError("whole-window computation runs with joint context on one process and nothing else")
        self.model, self.setup, self.cache = model, setup, cache
        self.context, self.placement, self.skip, self.switch = parts.context, parts.placement, parts.skip, parts.switch
        self.schedule, self.solver, self.noise = setup.schedule, setup.solver, setup.noise
        self.guidance, self.rope, self.attention, self.fps = setup.guidance, setup.rope, setup.attention, setup.fps
        self.block_shape = tuple(setup.block_shape)
        self.frames_per_block = self.block_shape[2]
        self.records = self.skip.records or self.context.records
        self.noisy: dict[int, torch.Tensor] = {}  # started (or, in window mode, waiting) blocks
        self.clean: dict[int, torch.Tensor] = {}  # finished blocks not yet committed / still in view
        self.inflight: dict[int, BlockKV] = {}  # K/V of in-flight blocks' last computed step (when kept)
        self.pre_ready: set[int] = set()
        self.stats = RunStats()
        self.suspended = False
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
        text,
        *,
        initial: Callable[[int], torch.Tensor] | None = None,
        prefix: dict[int, torch.Tensor] | None = None,
    ) -> Iterator[Block]:
        """Execute `ticks`; yield each block once its last step is done (where the output is).

        `text`: the prompt's conditioning, or a function of the tick (a switch lands as the switch
        part says). `initial(b)`: block b's starting noise (default: the stream's noise for (b, 0)).
        `prefix`: clean latents of pre-ready blocks.
        """
        self.start(initial=initial, prefix=prefix)
        for tick in ticks:
            finished = self.step(tick, text)
            yield from self.placement.deliver(self, tick, finished)
        self.context.drain(self)

    def start(
        self, *, initial: Callable[[int], torch.Tensor] | None = None, prefix: dict[int, torch.Tensor] | None = None
    ) -> None:
        """Set the starting noise and the clean prefix before the first tick."""
        self._initial = initial or self._noise_block
        for block, latents in (prefix or {}).items():
            self.clean[block] = latents.to(self.device, torch.float32)
            self.pre_ready.add(block)

    def step(self, tick: Tick, text) -> list[Block]:
        """Run one tick; this process's blocks whose last step it was, in order. `text`: the
        conditioning, or a function of the tick, asked only once the tick has been announced
        (a rank that hangs there is then named as hanging in this tick).

        The phases, which engine/runtime/coalesce.py runs for many streams at once: `prepare`
        (everything up to the tick's forward), the forward, `finish` (solver steps and after)."""
        prepared = self.prepare(tick, text)
        if prepared.view is not None:
            prepared.flows = self.forward(prepared.run, prepared.text, prepared.view)
        return self.finish(prepared)

    def prepare(self, tick: Tick, text) -> Prepared:
        """The tick up to its forward: settle, the prompt, the members, which of them run. With
        joint context the forward is left to the caller (`Prepared.view`); otherwise (whole-window
        computation, lagged context's forward per block) its flows are already computed."""
        if self.suspended:
            raise RuntimeError("this stream is suspended: resume() it before its next tick")
        self.placement.on_tick(tick)
        self.context.settle(self)
        requested = text(tick) if callable(text) else text
        text = self.switch.text_for(self, tick, requested)
        if self.setup.compute == "window":
            return Prepared(tick, text, flows=self._window_flows(tick, text))
        run = self.skip.choose(self, tick, self._selective_members(tick), text)
        if isinstance(self.context, Joint) and run:
            return Prepared(tick, text, run, view=self.context.open(self, tick, run))
        return Prepared(tick, text, run, flows=self.context.forward(self, tick, run, text))

    def finish(self, prepared: Prepared) -> list[Block]:
        """The tick after its forward: commit, skipped blocks' flows, solver steps, bookkeeping."""
        tick, flows = prepared.tick, prepared.flows
        if prepared.view is not None:
            self.context.close(self, prepared.view)
        flows.update(self.skip.after(self, tick, prepared.run, flows))
        finished = list(self._apply(tick, flows))
        self.skip.end_tick(self, tick)
        self._forget(tick)
        self.switch.finished(self, finished)
        self.stats.ticks += 1
        self.stats.skip = self.skip.counts()
        return finished

    def _window_flows(self, tick: Tick, text) -> dict[int, torch.Tensor]:
        """Whole-window computation: every block of the tick's window in one forward, no cache."""
        members = self._window_members(tick)
        frames = len(members) * self.frames_per_block
        first = members[0][0] * self.frames_per_block
        view = LocalView(self.rope, first, frames, self.frames_per_block, self.attention,
                         self.reach(tick, [m[0] for m in members]))  # fmt: skip
        return self.forward(members, text, view)

    def reach(self, tick: Tick, blocks: Iterable[int]) -> dict[int, int] | None:
        """How many blocks back (itself included) each block of a forward attends to, or None for
        the whole window. With `history_reach` (MAGI-1) a denoising block's reach depends on its
        stage; committing and already clean blocks see `commit_reach` blocks."""
        history = self.setup.history_reach
        if history is None:
            return None
        per_stage = self.schedule.steps // len(history)
        work = {w.block: w for w in tick.work if not w.commit}
        return {b: history[work[b].step // per_stage] if b in work else self.setup.commit_reach for b in blocks}

    def keep(self, recorded: dict[int, BlockKV]) -> None:
        """Keep the K/V of blocks still denoising: others attend to them while they are skipped."""
        for block, kv in recorded.items():
            if block in self.noisy:
                self.inflight[block] = kv

    # -- suspending ----------------------------------------------------------------------------

    def suspend(self) -> int:
        """Move this stream's device state to host memory (pinned on a GPU) and free the device
        copies: KV buffers, latents, in-flight K/V, solver and skip-part state. Bytes moved. The
        stream takes no tick until `resume`, after which it continues exactly as if it had not
        stopped. Lagged context takes in the last tick's K/V first (what a later settle would)."""
        if self.suspended:
            return 0
        # A stream spread over ranks is suspended on each of them at the same round boundary (its
        # group's leader says when: engine/serving/group.py); each rank moves its own share.
        self.context.settle(self)
        moved = relocate(self.stream_state(), torch.device("cpu"))
        self.suspended = True
        return moved

    def resume(self) -> int:
        """Bring the state `suspend` moved back to the device; bytes moved."""
        if not self.suspended:
            return 0
        moved = relocate(self.stream_state(), self.device)
        self.suspended = False
        return moved

    def stream_state(self) -> list:
        """What this stream holds for itself (engine/runtime/offload.py walks it for tensors)."""
        return [self.cache, self.noisy, self.clean, self.inflight, self.solver, self.skip, self.switch, self.context]

    # -- choosing the inputs -------------------------------------------------------------------

    def _selective_members(self, tick: Tick) -> list[Member]:
        """(block, input latents, network time) of the tick's blocks this process owns."""
        self._check_selective(tick)
        return [self._input(w, tick) for w in tick.work if self.placement.owns(w.block)]

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

    def _window_members(self, tick: Tick) -> list[Member]:
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

    def _input(self, work: Work, tick: Tick) -> Member:
        if work.commit:
            return self._clean_input(work.block, tick)
        if work.block not in self.noisy:
            self.noisy[work.block] = self._initial(work.block)
        return work.block, self.noisy[work.block], work.t_in

    def _clean_input(self, block: int, tick: Tick) -> Member:
        latents, noise_t = self.clean[block], self.setup.prefix_noise_t
        if block in self.pre_ready and noise_t > 0:
            # SkyReels-V2's addnoise_condition: put a little noise back on the clean prefix
            share = noise_t / TRAIN_TIMESTEPS
            fresh = self.noise.noise(self.block_shape, block, PREFIX_NOISE_STEP + tick.index, self.device)
            return block, latents * (1.0 - share) + fresh * share, noise_t
        return block, latents, self.schedule.commit_t

    # -- the forward ---------------------------------------------------------------------------

    def forward(self, members: list[Member], text, view) -> dict[int, torch.Tensor]:
        """One guided forward over `members` through `view`: {block: flow `[1, C, F, H, W]`}."""
        x = self.inputs(members)
        with torch.no_grad(), self.skip.observe(self, [b for b, _, _ in members]):
            flow = self.guidance(self, members, x, self.sigma(members), text, view)
        return self.outputs(members, flow, view)

    @staticmethod
    def inputs(members: list[Member]) -> torch.Tensor:
        """The members' latents side by side: `[1, C, frames, H, W]`."""
        return torch.cat([latents for _, latents, _ in members], dim=2)

    def outputs(self, members: list[Member], flow: torch.Tensor, view) -> dict[int, torch.Tensor]:
        """Count the forward and split its guided flow `[1, C, frames, H, W]` per member."""
        frames = flow.shape[2]
        self.stats.count(frames, getattr(view, "key_frames", frames))
        split = flow.split([latents.shape[2] for _, latents, _ in members], dim=2)
        return {block: part for (block, _, _), part in zip(members, split)}

    def sigma(self, members: list[Member]) -> torch.Tensor:
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
            if work.commit or not self.placement.owns(work.block):
                continue
            latents = self.solver.step(work, self.noisy[work.block], flows[work.block])
            if not work.last:  # the block's own step count (a session may lower it between blocks)
                self.noisy[work.block] = latents
                continue
            del self.noisy[work.block]
            self.solver.release(work.block)
            self.clean[work.block] = latents
            yield Block(work.block, work.block * self.frames_per_block, latents)

    def _forget(self, tick: Tick) -> None:
        """Drop clean latents and kept K/V nothing will read again."""
        if self.setup.compute == "window":
            for block in [b for b in self.clean if b < tick.window[0]]:
                del self.clean[block]
            return
        for work in tick.work:
            if work.commit:
                self.clean.pop(work.block, None)
                self.inflight.pop(work.block, None)  # lagged context re-receives it to commit
