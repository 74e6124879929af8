"""Attention for a forward that computes only some of a tick's blocks.

Keys are laid out exactly as in the executor's one forward over the tick (committed context,
then every in-flight block in block order, in the KV cache's scratch), but only the blocks being
computed bring queries. A block that is reused or predicted this tick is still attended to: by
the K/V of its last computed step, kept per block (`BlockKV`, recorded here). With every block
computed this is the executor's forward, value for value.
"""

from __future__ import annotations

import torch

from engine.runtime.kv import AttentionView, KVCache, block_mask
from engine.runtime.lagged import BlockKV


class SparseView(AttentionView):
    """Queries of `computed` blocks; keys of every block in `blocks` that is computed or stored.

    `blocks`: the tick's in-flight blocks in order; `stored`: K/V of blocks not computed now;
    a block that is neither (it has never run) is left out of the keys. The first `commits`
    blocks (all computed) are written to the cache by `finish()`.
    """

    def __init__(
        self,
        cache: KVCache,
        blocks: list[int],
        computed: list[int],
        stored: dict[int, BlockKV],
        block_frames: int,
        mode: str,
        commits: int = 0,
        reach: dict[int, int] | None = None,
    ):
        present = [b for b in blocks if b in computed or b in stored]
        super().__init__(cache.rope, present[0] * block_frames, len(present) * block_frames, block_frames, mode, reach)
        if computed != [b for b in present if b in computed]:
            raise ValueError(f"computed blocks {computed} must be among {blocks}, in order")
        if present[:commits] != computed[:commits]:
            raise ValueError("committing blocks must come first and be computed")
        self.cache, self.present, self.computed, self.stored = cache, present, computed, stored
        self.tokens = block_frames * cache.T
        self.scratch_slot = cache.visible_frames
        self.end = (self.scratch_slot + self.frames) * cache.T
        self.commit_frames = commits * block_frames
        self.own_rotation = torch.cat([cache.rope.tables(b * block_frames, block_frames) for b in computed])
        self.own_mask = self._rows_of_computed(block_frames)
        self.recorded_k: list[torch.Tensor] = []
        self.recorded_v: list[torch.Tensor] = []

    def _rows_of_computed(self, block_frames: int) -> torch.Tensor | None:
        if self.mode == "bidirectional":
            return None
        return block_mask(
            self.cache.visible_frame_ids(), self.present, block_frames, self.cache.T, self.rotation.device,
            self.reach, self.computed,
        )  # fmt: skip

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q, k, v: [B, n_computed * tokens, H, Dh]
        k = self.rope.apply(k, self.own_rotation)
        self.recorded_k.append(k)
        self.recorded_v.append(v)
        cache, start, mine = self.cache, self.scratch_slot * self.cache.T, 0
        for block in self.present:
            span = slice(start, start + self.tokens)
            if block in self.computed:
                own = slice(mine * self.tokens, (mine + 1) * self.tokens)
                cache.k[layer, :, span], cache.v[layer, :, span] = k[:, own], v[:, own]
                mine += 1
            else:
                cache.k[layer, :, span] = self.stored[block].keys[layer]
                cache.v[layer, :, span] = self.stored[block].values[layer]
            start += self.tokens
        keys, values = cache.k[layer, :, : self.end], cache.v[layer, :, : self.end]
        return self.rope.apply(q, self.own_rotation), keys, values, self.own_mask

    def recorded(self) -> dict[int, BlockKV]:
        """Each computed block's K/V of this forward, every layer: `[L, B, tokens, H, Dh]`."""
        keys, values = torch.stack(self.recorded_k), torch.stack(self.recorded_v)
        spans = [slice(i * self.tokens, (i + 1) * self.tokens) for i in range(len(self.computed))]
        return {b: BlockKV(keys[:, :, span], values[:, :, span]) for b, span in zip(self.computed, spans)}

    def finish(self) -> None:
        if self.commit_frames:
            self.cache._commit(self.scratch_slot, self.first_frame, self.commit_frames)
