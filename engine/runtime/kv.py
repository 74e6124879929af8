"""Key/value context for self-attention: a preallocated cache of committed (clean) frames.

Layout of one layer's buffer, in frames of `T = tokens_per_frame` tokens each:

    [ sink (S) | ring of recent frames (R) | scratch for the call's in-flight frames (Q) ]

* Keys are stored already rotated (RoPE) at their absolute frame position, so committed keys are
  rotated once, when they are written. Queries are rotated at their absolute position too; RoPE
  depends only on the distance between the two, and positions are computed on the fly
  (`engine.models.rope`), so a stream runs past any table length.
* Once the ring wraps, the oldest recent frame is frame `first = committed - R`. The sink frames
  are then moved, by one extra time rotation from their stored copy, to sit right before it
  (positions first-S .. first-1), the way LongLive's infinite-length variant re-bases its sink.
  Before the ring wraps every frame sits at its true position, so a stream shorter than the
  window is exactly the block-causal model the checkpoints were trained as.
* A call's own K/V go to the scratch slots right after the visible committed frames, so that the
  keys attended to are one contiguous slice (no concatenation of the whole window per layer).
  Committing a call copies those frames into their ring slots after the forward: during the
  forward they must not overwrite the frames they evict, which the call still attends to.

All bookkeeping is host integers known from the schedule; nothing here reads device memory.
"""

from __future__ import annotations

import torch

from engine.models.rope import Rope

ATTENTION_MODES = ("causal", "bidirectional")


def block_mask(
    context_frames: list[int],
    blocks: list[int],
    block_frames: int,
    tokens_per_frame: int,
    device: torch.device,
    reach: dict[int, int] | None = None,
    queries: list[int] | None = None,
) -> torch.Tensor | None:
    """Boolean `[len(queries)*F*T, (len(context_frames) + len(blocks)*F)*T]` mask, or None if all true.

    Keys are the committed `context_frames` (absolute frame indices), then the in-flight `blocks`
    in order; the queries are those of `queries` (default: every block; a subset when only some
    blocks are computed). A block sees keys of blocks <= itself; with `reach`, block b sees only
    blocks b - reach[b] + 1 .. b (MAGI-1's per-chunk KV range, 1 for a committing chunk).
    Built per frame on the host, then expanded to tokens on the device.
    """
    queries = blocks if queries is None else queries
    key_blocks = torch.tensor(
        [f // block_frames for f in context_frames] + [b for b in blocks for _ in range(block_frames)]
    )
    query_blocks = torch.tensor(queries).repeat_interleave(block_frames)
    mask = key_blocks[None, :] <= query_blocks[:, None]  # [F_q, F_k]
    if reach is not None:
        lowest = torch.tensor([b - reach[b] + 1 for b in queries]).repeat_interleave(block_frames)
        mask &= key_blocks[None, :] >= lowest[:, None]
    if bool(mask.all()):
        return None
    T = tokens_per_frame
    return mask.repeat_interleave(T, 0).repeat_interleave(T, 1).to(device)


class AttentionView:
    """What one forward call attends to: its in-flight frames plus (maybe) committed context.

    The model calls `context(layer, q, k, v)` once per layer with un-rotated q/k `[B, N, H, Dh]`
    and gets back rotated queries, the keys/values to attend to and an optional boolean mask.
    The caller of the model calls `finish()` after the forward (commits, if the view writes).
    """

    def __init__(
        self,
        rope: Rope,
        first_frame: int,
        frames: int,
        block_frames: int,
        mode: str,
        reach: dict[int, int] | None = None,
    ):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if frames % block_frames:
            raise ValueError(f"{frames} frames do not split into blocks of {block_frames}")
        self.rope = rope
        self.first_frame = first_frame
        self.frames = frames
        self.block_frames = block_frames
        self.mode = mode
        self.reach = reach
        """Per in-flight block, how many blocks back (itself included) it may see; None: all."""
        self.rotation = rope.tables(first_frame, frames)  # [N, Dh/2] complex
        self._mask: torch.Tensor | None = None

    @property
    def blocks(self) -> list[int]:
        first = self.first_frame // self.block_frames
        return list(range(first, first + self.frames // self.block_frames))

    def _mask_for(self, context_frames: list[int]) -> torch.Tensor | None:
        if self.mode == "bidirectional":
            return None
        if self._mask is None:
            self._mask = block_mask(
                context_frames, self.blocks, self.block_frames, self.rope.tokens_per_frame, self.rope.device, self.reach
            )
        return self._mask

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the forward; a view that commits writes its frames here."""


class LocalView(AttentionView):
    """No committed context: the call's frames attend among themselves (block-causal or not)."""

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.rope.apply(q, self.rotation), self.rope.apply(k, self.rotation), v, self._mask_for([])


class KVCache:
    """Committed K/V of one stream, for every layer, in preallocated fixed-shape buffers."""

    def __init__(
        self,
        *,
        rope: Rope,
        layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        sink_frames: int,
        ring_frames: int,
        scratch_frames: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if min(sink_frames, ring_frames) < 0 or scratch_frames <= 0:
            raise ValueError("sink/ring frames must be >= 0 and scratch frames > 0")
        self.rope = rope
        self.T = rope.tokens_per_frame
        self.S, self.R, self.Q = sink_frames, ring_frames, scratch_frames
        slots = (self.S + self.R + self.Q) * self.T
        shape = (layers, batch, slots, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.sink_k = torch.zeros((layers, batch, self.S * self.T, heads, head_dim), dtype=dtype, device=device)
        self.commit_from: int | None = None
        """If set, committed frames keep this batch element's K/V in every element (MAGI-1's base
        guidance: the null-caption pass writes the cache both conditioned passes read)."""
        self.reset()

    # -- bookkeeping (host integers) -------------------------------------------------------

    @property
    def visible_frames(self) -> int:
        """Committed frames a new call attends to (sink + the most recent ring frames)."""
        held = self.committed - self.origin
        return min(held, self.S) + min(max(held - self.S, 0), self.R)

    def first_recent_frame(self) -> int:
        """Absolute index of the oldest committed frame still in the ring."""
        return max(self.origin + self.S, self.committed - self.R)

    def visible_frame_ids(self) -> list[int]:
        """Absolute indices of the visible committed frames, oldest first."""
        sink = list(range(self.origin, self.origin + min(self.committed - self.origin, self.S)))
        return sink + list(range(self.first_recent_frame(), self.committed))

    def slot_of(self, frame: int) -> int | None:
        """Buffer slot (in frames) where committed frame `frame` lives; None if it is not kept."""
        relative = frame - self.origin
        if relative < self.S:
            return relative
        if self.R == 0:
            return None
        return self.S + (relative - self.S) % self.R

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.sink_k))

    def reset(self, origin: int = 0) -> None:
        """Forget every committed frame; the next commit is frame `origin` (0: a new stream; later:
        rebuilding the recent window, as LongLive's recache does). Buffers are reused."""
        self.origin = self.committed = origin
        self._sink_base = 0

    def view(
        self,
        *,
        first_frame: int,
        frames: int,
        block_frames: int,
        mode: str,
        commit_frames: int = 0,
        reach: dict[int, int] | None = None,
    ) -> CachedView:
        """A call over frames [first_frame, first_frame + frames) whose first `commit_frames` frames
        (finished blocks) are written to the cache when the call finishes."""
        if first_frame != self.committed:
            raise ValueError(f"the call starts at frame {first_frame} but {self.committed} frames are committed")
        if frames > self.Q:
            raise ValueError(f"{frames} in-flight frames exceed the cache's scratch of {self.Q}")
        if not 0 <= commit_frames <= frames:
            raise ValueError(f"cannot commit {commit_frames} of {frames} frames")
        return CachedView(self, first_frame, frames, block_frames, mode, commit_frames, reach)

    # -- writes ------------------------------------------------------------------------------

    def append(self, first_frame: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Commit frames whose K/V were computed elsewhere: keys (rotated) / values `[L, B, n*T, H, Dh]`."""
        if first_frame != self.committed:
            raise ValueError(f"appending frame {first_frame} but {self.committed} frames are committed")
        frames = keys.shape[2] // self.T
        if frames > self.Q:
            raise ValueError(f"{frames} frames exceed the cache's scratch of {self.Q}")
        start = self.visible_frames * self.T
        self.k[:, :, start : start + keys.shape[2]] = keys
        self.v[:, :, start : start + keys.shape[2]] = values
        self._commit(self.visible_frames, first_frame, frames)

    def _copy_frame(self, src: int, dst: int) -> None:
        T = self.T
        self.k[:, :, dst * T : (dst + 1) * T] = self.k[:, :, src * T : (src + 1) * T]
        self.v[:, :, dst * T : (dst + 1) * T] = self.v[:, :, src * T : (src + 1) * T]

    def _share_frame(self, slot: int) -> None:
        span, source = slice(slot * self.T, (slot + 1) * self.T), self.commit_from
        self.k[:, :, span] = self.k[:, source : source + 1, span]
        self.v[:, :, span] = self.v[:, source : source + 1, span]

    def _commit(self, scratch_slot: int, first_frame: int, frames: int) -> None:
        T = self.T
        for j in range(frames):
            frame, src = first_frame + j, scratch_slot + j
            sink_slot = frame - self.origin
            if sink_slot < self.S:  # keep a copy rotated at its true position, to re-base later
                self.sink_k[:, :, sink_slot * T : (sink_slot + 1) * T] = self.k[:, :, src * T : (src + 1) * T]
            dst = self.slot_of(frame)
            if dst is not None and dst != src:
                self._copy_frame(src, dst)
            if dst is not None and self.commit_from is not None:
                self._share_frame(dst)
        self.committed += frames
        self._rebase_sink()

    def _rebase_sink(self) -> None:
        """Rotate the sink so that it sits right before the oldest visible ring frame."""
        base = self.first_recent_frame() - self.S - self.origin
        if self.S == 0 or base == self._sink_base:
            return
        shift = self.rope.time_shift(base)
        sink_tokens = self.S * self.T
        for layer in range(self.k.shape[0]):
            self.k[layer, :, :sink_tokens] = self.rope.apply(self.sink_k[layer], shift)
        self._sink_base = base


class CachedView(AttentionView):
    """A call whose frames attend to the cache's visible frames and to each other."""

    def __init__(
        self,
        cache: KVCache,
        first_frame: int,
        frames: int,
        block_frames: int,
        mode: str,
        commit_frames: int,
        reach: dict[int, int] | None = None,
    ):
        super().__init__(cache.rope, first_frame, frames, block_frames, mode, reach)
        self.cache = cache
        self.context_frames = cache.visible_frame_ids()
        self.commit_frames = commit_frames
        self.scratch_slot = cache.visible_frames  # the call's frames follow the visible ones
        self._end = (self.scratch_slot + frames) * cache.T

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cache = self.cache
        start = self.scratch_slot * cache.T
        cache.k[layer, :, start : self._end] = self.rope.apply(k, self.rotation)
        cache.v[layer, :, start : self._end] = v
        keys = cache.k[layer, :, : self._end]  # [B, visible*T + N, H, Dh]
        values = cache.v[layer, :, : self._end]
        return self.rope.apply(q, self.rotation), keys, values, self._mask_for(self.context_frames)

    def finish(self) -> None:
        if self.commit_frames:
            self.cache._commit(self.scratch_slot, self.first_frame, self.commit_frames)
