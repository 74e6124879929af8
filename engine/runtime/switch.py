"""How a prompt switch lands: the switch part of the executor.

* `NextStep`: in-flight blocks take the new prompt at their next step; committed K/V stay as
  computed (the cascade's way: no extra pass).
* `Recache`: LongLive's switch for sequential plans (`_recache_after_switch`). Committed K/V were
  computed under the old prompt (cross-attention shapes every layer's output), so it
  1. keeps the old prompt until the next block boundary;
  2. re-runs the visible committed frames (their clean latents, kept for this) in one forward at
     the commit level under the new prompt, block-causally, rewriting their K/V;
  3. continues with the new prompt.
"""

from __future__ import annotations

import torch

from engine.plan.timeline import Tick
from engine.runtime.outputs import Block


class NextStep:
    def text_for(self, ex, tick: Tick, requested):
        return requested

    def finished(self, ex, blocks: list[Block]) -> None:
        pass


class Recache:
    def __init__(self):
        self.history: dict[int, torch.Tensor] = {}  # clean latents of recently finished blocks
        self._current = None

    def text_for(self, ex, tick: Tick, requested):
        """Keep the running prompt until a block starts; then recache and take the new one."""
        boundary = all(w.step == 0 for w in tick.work)
        if self._current is None or (boundary and requested is not self._current):
            if self._current is not None:
                self.recache(ex, requested)
            self._current = requested
        return self._current

    def finished(self, ex, blocks: list[Block]) -> None:
        for block in blocks:
            self.history[block.index] = block.latents
        F, cache = ex.frames_per_block, ex.cache
        keep = cache.S + cache.R + F  # frames any recache can need
        for old in [b for b in self.history if (b + 1) * F < cache.committed - keep]:
            del self.history[old]

    def recache(self, ex, text) -> None:
        """Rewrite the visible committed frames' K/V under `text` (one forward at the commit level)."""
        cache, F = ex.cache, ex.frames_per_block
        frames = cache.visible_frame_ids()
        if not frames:
            return
        first_block, last_block = frames[0] // F, frames[-1] // F
        latents = torch.cat([self.history[b] for b in range(first_block, last_block + 1)], dim=2)
        latents = latents[:, :, frames[0] - first_block * F : frames[-1] - first_block * F + 1]
        cache.reset(origin=frames[0])
        view = cache.view(first_frame=frames[0], frames=len(frames), block_frames=F, mode="causal",
                          commit_frames=len(frames))  # fmt: skip
        ex.forward([(first_block, latents, ex.schedule.commit_t)], text, view)
        view.commit()
        ex.stats.recaches += 1
