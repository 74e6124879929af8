"""Lagged context: an in-flight block sees the other in-flight blocks' K/V from the previous tick.

In a cascade every in-flight block lives on its own rank. With `joint` context the ranks trade
K/V at every layer, so a tick equals one forward over all its blocks. With `lagged` context a
block attends to its neighbours' K/V as they were one tick earlier, so K/V travel once per tick
and the transfer overlaps compute. This file is those semantics on one device (one forward per
block per tick), the reference a distributed run must reproduce exactly:

* tick t, block b: keys = [committed context | neighbours' tick t-1 K/V | b's own K/V now], in
  block order; a neighbour that started at tick t has no K/V yet and is left out;
* after the tick every block's fresh K/V replace the previous ones, and blocks whose commit pass
  ran append their clean K/V to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.wan import TextKV
from engine.plan.timeline import Tick
from engine.runtime.executor import Executor
from engine.runtime.kv import AttentionView, KVCache


@dataclass
class BlockKV:
    """One block's K/V for every layer: keys (rotated) and values `[L, B, F*T, H, Dh]`."""

    keys: torch.Tensor
    values: torch.Tensor


class LaggedView(AttentionView):
    """One block's forward: keys are the committed context, then the in-flight blocks in order."""

    def __init__(
        self,
        cache: KVCache,
        block: int,
        block_frames: int,
        mode: str,
        before: list[BlockKV],
        after: list[BlockKV],
        layers: int,
    ):
        super().__init__(cache.rope, block * block_frames, block_frames, block_frames, mode)
        self.cache, self.before, self.after = cache, before, after
        T = cache.T
        self.own_start = (cache.visible_frames + len(before) * block_frames) * T
        self.own_end = self.own_start + block_frames * T
        self.end = self.own_end + len(after) * block_frames * T
        if self.end > (cache.visible_frames + cache.Q) * T:
            raise ValueError("the in-flight blocks exceed the cache's scratch")
        self.recorded_k: list[torch.Tensor | None] = [None] * layers
        self.recorded_v: list[torch.Tensor | None] = [None] * layers
        self._lag_mask = None if mode == "bidirectional" or not after else self._causal_mask()

    def _causal_mask(self) -> torch.Tensor:
        # own queries see everything up to their own block, not the blocks after it
        mask = torch.ones(self.own_end - self.own_start, self.end, dtype=torch.bool, device=self.rotation.device)
        mask[:, self.own_end :] = False
        return mask

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cache, span = self.cache, self.own_end - self.own_start
        k = self.rope.apply(k, self.rotation)
        self.recorded_k[layer], self.recorded_v[layer] = k, v
        start = cache.visible_frames * cache.T
        for neighbour in self.before + [None] + self.after:
            if neighbour is None:  # this block's own slot
                cache.k[layer, :, start : start + span], cache.v[layer, :, start : start + span] = k, v
            else:
                cache.k[layer, :, start : start + span] = neighbour.keys[layer]
                cache.v[layer, :, start : start + span] = neighbour.values[layer]
            start += span
        keys, values = cache.k[layer, :, : self.end], cache.v[layer, :, : self.end]
        return self.rope.apply(q, self.rotation), keys, values, self._lag_mask

    def recorded(self) -> BlockKV:
        return BlockKV(torch.stack(self.recorded_k), torch.stack(self.recorded_v))


class LaggedExecutor(Executor):
    """The executor with lagged context: one forward per in-flight block per tick."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.compute != "selective":
            raise ValueError("lagged context needs selective computation (a KV cache)")
        self.previous: dict[int, BlockKV] = {}

    def _compute(self, tick: Tick, text: TextKV) -> dict[int, torch.Tensor]:
        blocks = tick.blocks
        flows, fresh = {}, {}
        for member in self._selective_members(tick):
            block = member[0]
            view = self._view_for(block, blocks)
            flows.update(self._forward([member], text, view))
            self._count(1, self.cache.visible_frames + (len(view.before) + len(view.after)) * self.frames_per_block)
            fresh[block] = view.recorded()
        self._after_forwards(tick, fresh)
        return flows

    def _view_for(self, block: int, blocks: list[int]) -> LaggedView:
        before = [self.previous[b] for b in blocks if b < block and b in self.previous]
        after = [self.previous[b] for b in blocks if b > block and b in self.previous]
        return LaggedView(
            self.cache, block, self.frames_per_block, self.attention, before, after, self.model.cfg.num_layers
        )

    def _after_forwards(self, tick: Tick, fresh: dict[int, BlockKV]) -> None:
        """Make this tick's K/V the next tick's context and commit finished blocks (in block order)."""
        self.previous = fresh
        for work in tick.work:
            if work.commit:
                kv = fresh.pop(work.block)
                self.cache.append(work.block * self.frames_per_block, kv.keys, kv.values)
