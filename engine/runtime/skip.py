"""Which working blocks leave a tick's forward: the skip part of the executor.

A skip part (feature caching, cache/skip.py) sees each tick's working blocks before the forward
and chooses those that run; for the others it supplies their flow afterwards (reused or
predicted). Blocks it skips are still attended to, through the K/V of their last computed step,
which the executor keeps when `records` is set. `NoSkip` runs everything.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from engine.plan.timeline import Tick

Member = tuple[int, torch.Tensor, float]
"""(block, input latents `[B, C, F, H, W]`, network time) of one block in a forward."""


class Skip(Protocol):
    records: bool
    """Skipped blocks are attended to through their last computed K/V: the executor keeps them."""
    shares_forward: bool
    """Its `observe` needs nothing of the forward, so the forward may be one model call with other
    streams' (engine/runtime/coalesce.py). A part that taps layer features sees the whole batch
    of such a call, so it says False and its stream runs its forwards alone."""

    def choose(self, executor, tick: Tick, members: list[Member], text) -> list[Member]:
        """The members that run this tick (in order); committing members always run."""
        ...

    def observe(self, ex, blocks: list[int]) -> contextlib.AbstractContextManager:
        """Held around each forward over `blocks` (policies that read layer features tap them here)."""
        ...

    def after(self, executor, tick: Tick, run: list[Member], flows: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Learn from the computed flows; return the flows of the skipped working blocks."""
        ...

    def end_tick(self, executor, tick: Tick) -> None:
        """Drop the state of blocks that finished."""
        ...

    def counts(self) -> dict[str, int]:
        """Decision and FLOP counts so far (RunStats.skip); empty when nothing is skipped."""
        ...

    def set_fidelity(self, threshold: float | None) -> None:
        """Per-stream, per-tick fidelity knob (the session scheduler's): decide from the next tick
        with this reuse threshold instead of the configured one (None: the configured one again)."""
        ...


class NoSkip:
    records = False
    shares_forward = True

    def choose(self, executor, tick: Tick, members: list[Member], text) -> list[Member]:
        return members

    def observe(self, ex, blocks: list[int]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after(self, executor, tick: Tick, run: list[Member], flows: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {}

    def end_tick(self, executor, tick: Tick) -> None:
        pass

    def counts(self) -> dict[str, int]:
        return {}

    def set_fidelity(self, threshold: float | None) -> None:
        pass  # nothing is skipped at any fidelity
