"""LongLive's prompt switch for sequential plans: recompute the recent window under the new prompt.

Committed K/V were computed under the old prompt (cross-attention shapes every layer's output). A
sequential plan that switches prompts therefore (LongLive, `_recache_after_switch`):
1. keeps the old prompt until the next block boundary;
2. re-runs the visible committed frames (their clean latents, kept for this) in one forward at
   the commit level under the new prompt, block-causally, rewriting their K/V;
3. continues with the new prompt.
The cascade needs none of this: in-flight blocks take the new prompt at their next step.
"""

from __future__ import annotations

import torch

from engine.models.wan import TextKV
from engine.plan.timeline import Tick
from engine.runtime.executor import Block, Executor


class RecacheExecutor(Executor):
    """A sequential executor that recaches the window when the prompt changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cache is None or self.cache.S:
            raise ValueError("recache needs a KV cache without sink frames")
        self.history: dict[int, torch.Tensor] = {}  # clean latents of recently finished blocks
        self.recaches = 0
        self._current: TextKV | None = None

    def _text_for(self, tick: Tick, requested: TextKV) -> TextKV:
        """Keep the running prompt until a block starts; then recache and take the new one."""
        boundary = all(w.step == 0 for w in tick.work)
        if self._current is None or (boundary and requested is not self._current):
            if self._current is not None:
                self.recache(requested)
            self._current = requested
        return self._current

    def step(self, tick: Tick, text: TextKV) -> list[Block]:
        finished = super().step(tick, text)
        for block in finished:
            self.history[block.index] = block.latents
        keep = self.cache.S + self.cache.R + self.frames_per_block  # frames any recache can need
        for old in [b for b in self.history if (b + 1) * self.frames_per_block < self.cache.committed - keep]:
            del self.history[old]
        return finished

    def recache(self, text: TextKV) -> None:
        """Rewrite the visible committed frames' K/V under `text` (one forward at the commit level)."""
        frames = self.cache.visible_frame_ids()
        if not frames:
            return
        F = self.frames_per_block
        first_block, last_block = frames[0] // F, (frames[-1]) // F
        latents = torch.cat([self.history[b] for b in range(first_block, last_block + 1)], dim=2)
        latents = latents[:, :, frames[0] - first_block * F : frames[-1] - first_block * F + 1]
        self.cache.reset(origin=frames[0])
        view = self.cache.view(first_frame=frames[0], frames=len(frames), block_frames=F, mode="causal",
                               commit_frames=len(frames))  # fmt: skip
        self._forward([(first_block, latents, self.schedule.commit_t)], text, view)
        self._count(1, 0)
        self.recaches += 1
