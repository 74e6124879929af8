"""Attention views: what one forward's self-attention attends to.

* `LocalView`: no committed context, the call's frames among themselves (whole-window reruns,
  training, guidance passes of a chunk alone).
* `InFlightView`: the one view of a tick's in-flight K/V. Keys are laid out as

      [ committed frames, in slot order | present in-flight blocks, in block order ]

  in the KV cache's scratch, so the keys are one contiguous slice. Only the `computed` blocks
  bring queries; every other present block is attended to through K/V that `fill` supplies: the
  K/V of its last computed step (feature caching skipped it), of the previous tick (lagged
  context), or of a peer rank (a cascade). With every present block computed here and no `fill`,
  this is one plain forward over the tick.

The mask is built from the frame each cache slot actually holds (`Slots.slot_frames`): once
the ring wraps, slot order is not frame order, and per-block KV reaches (MAGI-1) must admit the
right frames. Committing is a separate, public step (`commit`), which the runtime calls after the
forward: the forward still attends to the frames a commit evicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from engine.models.attention import block_mask, check_mode
from engine.runtime.outputs import BlockKV

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One block's keys (rotated) and values at one layer: `[B, F*T, H, Dh]` each."""
Fill = Callable[[int, dict[int, LayerKV]], dict[int, LayerKV]]
"""fill(layer, fresh K/V of the computed blocks) -> K/V of the present blocks not computed here."""


class Slots(Protocol):
    """What a view uses of a KV cache (engine/runtime/kv.py's `KVCache`, which makes the views:
    named here as a protocol so that the two modules do not import each other)."""

    T: int  # tokens per frame
    Q: int  # scratch frames
    k: torch.Tensor
    rope: Any  # the family's rotary tables

    @property
    def visible_frames(self) -> int: ...

    def slot_frames(self) -> list[int]: ...

    def read(self, layer: int, inflight_tokens: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write(self, layer: int, offset: int, keys: torch.Tensor, values: torch.Tensor) -> None: ...

    def commit_scratch(self, first_frame: int, frames: int, offset: int = 0) -> None: ...


class InFlightView:
    """Queries of `computed` blocks against the committed frames and every `present` block.

    `present`: the in-flight blocks attended to, in block order; `computed` (in the same order)
    run in this forward; `fill` supplies the others' K/V per layer (see module docstring). The
    first `commits` present blocks (committing blocks come first in a tick; computed here or, on
    a cascade, by their owner rank) are written to the cache by `commit()`. With `record`
    the computed blocks' K/V of every layer are kept (`recorded()`) for later ticks.
    """

    def __init__(
        self,
        cache: Slots,
        present: list[int],
        computed: list[int],
        block_frames: int,
        mode: str,
        *,
        commits: int = 0,
        reach: dict[int, int] | None = None,
        fill: Fill | None = None,
        record: bool = False,
    ):
        check_mode(mode)
        if computed != [b for b in present if b in computed] or len(computed) != len(set(computed)):
            raise ValueError(f"computed blocks {computed} must be among the present {present}, in order")
        if commits > len(present):
            raise ValueError(f"cannot commit {commits} of {len(present)} present blocks")
        if fill is None and present != computed:
            raise ValueError(f"blocks {sorted(set(present) - set(computed))} are present but nothing fills them")
        if len(present) * block_frames > cache.Q:
            raise ValueError(f"{len(present) * block_frames} in-flight frames exceed the cache's scratch of {cache.Q}")
        self.cache, self.present, self.computed, self.fill = cache, present, computed, fill
        self.rope, self.block_frames, self.commits, self.record = cache.rope, block_frames, commits, record
        self.tokens = block_frames * cache.T  # per block
        self.scratch_slot = cache.visible_frames  # in-flight blocks follow the visible committed frames
        self.end = (self.scratch_slot + len(present) * block_frames) * cache.T
        self.rotation = self._rotation()
        self.mask = None if mode == "bidirectional" or not computed else block_mask(
            cache.slot_frames(), present, block_frames, cache.T, self.rope.device, reach, computed
        )  # fmt: skip
        self.recorded_k: list[torch.Tensor] = []
        self.recorded_v: list[torch.Tensor] = []
        self.own_offsets: tuple[int, ...] | None = None
        """After `fill_ahead`: scratch token offsets of the computed blocks, in order."""

    def _rotation(self) -> torch.Tensor:
        """`[n_computed * tokens, Dh/2]`: each computed block at its absolute frames."""
        F = self.block_frames
        if not self.computed:
            return self.rope.tables(0, 1)[:0]  # no queries: an empty table of the right width
        if self.computed == list(range(self.computed[0], self.computed[-1] + 1)):
            return self.rope.tables(self.computed[0] * F, len(self.computed) * F)
        return torch.cat([self.rope.tables(b * F, F) for b in self.computed])

    @property
    def key_frames(self) -> int:
        """Frames of keys each query may see (committed + present): what the forward's cost depends on."""
        return self.end // self.cache.T

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q, k, v: [B, n_computed * tokens, H, Dh]
        k = self.rope.apply(k, self.rotation)
        if self.record:
            self.recorded_k.append(k)
            self.recorded_v.append(v)
        self._write(layer, k, v)
        keys, values = self.cache.read(layer, self.end - self.scratch_slot * self.cache.T)
        return self.rope.apply(q, self.rotation), keys, values, self.mask

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out

    def fill_ahead(self, layers: int) -> None:
        """Write the other present blocks' K/V of every layer into the scratch before the forward,
        which then writes only its own blocks, at fixed offsets: a compiled forward sees these
        offsets, not block numbers or the fill (whose closures hold absolute block numbers, which
        would specialise a graph per block). Only for fills that do not need this forward's K/V
        (no per-layer exchange between ranks); a fill that passes the computed blocks' fresh K/V
        through (joint caching) gets placeholders for them, and they are not used."""
        if self.fill is None:
            return
        for layer in range(layers):
            filled = self.fill(layer, dict.fromkeys(self.computed))
            for i, block in enumerate(self.present):
                if block not in self.computed:
                    self.cache.write(layer, i * self.tokens, *filled[block])
        self.own_offsets = tuple(i * self.tokens for i, b in enumerate(self.present) if b in self.computed)
        self.fill = None

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put every present block's K/V of this layer into the scratch, in block order."""
        if self.fill is None and self.own_offsets is not None:  # the others were written ahead
            for j, offset in enumerate(self.own_offsets):
                own = slice(j * self.tokens, (j + 1) * self.tokens)
                self.cache.write(layer, offset, k[:, own], v[:, own])
            return
        if self.fill is None:  # all present blocks computed here: one contiguous copy
            self.cache.write(layer, 0, k, v)
            return
        fresh = {b: (k[:, i * self.tokens : (i + 1) * self.tokens], v[:, i * self.tokens : (i + 1) * self.tokens])
                 for i, b in enumerate(self.computed)}  # fmt: skip
        filled = self.fill(layer, fresh)
        for i, block in enumerate(self.present):
            self.cache.write(layer, i * self.tokens, *(fresh[block] if block in fresh else filled[block]))

    def exchange_only(self, layers: int, batch: int, heads: int, head_dim: int) -> None:
        """Fill the scratch without a forward: a cascade rank with no block to compute this tick
        still takes part in every layer's exchange (and commits what the others computed)."""
        empty = self.cache.k.new_zeros(batch, 0, heads, head_dim)
        for layer in range(layers):
            self._write(layer, empty, empty)

    def recorded(self) -> dict[int, BlockKV]:
        """Each computed block's K/V of this forward, every layer: `[L, B, tokens, H, Dh]`."""
        if not self.recorded_k:
            return {}
        keys, values = torch.stack(self.recorded_k), torch.stack(self.recorded_v)
        spans = [slice(i * self.tokens, (i + 1) * self.tokens) for i in range(len(self.computed))]
        return {b: BlockKV(keys[:, :, span], values[:, :, span]) for b, span in zip(self.computed, spans)}

    def commit(self) -> None:
        """Write the committing blocks' K/V from the scratch into the cache (after the forward)."""
        if self.commits:
            frames = self.commits * self.block_frames
            self.cache.commit_scratch(self.present[0] * self.block_frames, frames)
