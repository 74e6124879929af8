"""Key/value context for self-attention: a preallocated cache of committed (clean) frames.

Layout of one layer's buffer, in frames of `T = tokens_per_frame` tokens each:

    [ sink (S) | ring of recent frames (R) | scratch for the call's in-flight frames (Q) ]

* Keys are stored already rotated (RoPE) at their absolute frame position, so committed keys are
  rotated once, when they are written. Queries are rotated at their absolute position too; RoPE
  depends only on the distance between the two, and positions are computed on the fly
  (`engine.models.rope`), so a stream runs past any table length.
* The sink frames (the stream's first S) stay where they were written, at positions 0..S-1, as
  Self-Forcing's and LongLive v1's released code keeps them (`rebase_sink=False`, the default).
  With `rebase_sink`, once the ring wraps (its oldest frame is `first = committed - R`) they are
  moved by one extra time rotation from their stored copy to sit right before it (positions
  first-S .. first-1), the way Rolling Forcing / LongLive's infinite-length variant re-bases it.
  Before the ring wraps both are the same: every frame sits at its true position, so a stream
  shorter than the window is exactly the block-causal model the checkpoints were trained as.
* A call's own K/V go to the scratch slots right after the visible committed frames, so that the
  keys attended to are one contiguous slice (no concatenation of the whole window per layer).
  Committing a call copies those frames into their ring slots after the forward: during the
  forward they must not overwrite the frames they evict, which the call still attends to.
* `storage="fp8"` keeps the committed frames (sink + ring) in float8 e4m3 with per token x head
  scales (`engine.runtime.fp8`): the buffers above then hold only the scratch, in the model dtype
  (a block's own fresh K/V stay exact), and a layer's read dequantises its visible frames into a
  working buffer in front of the in-flight K/V, so the keys are still one contiguous slice. The
  rebased sink's stored copy stays in the model dtype (it is small): re-basing rotates from it
  and quantises once.

All bookkeeping is host integers known from the schedule; nothing here reads device memory.
"""

from __future__ import annotations

import torch

from engine.models.rope import Rope
from engine.runtime.fp8 import Fp8Frames
from engine.runtime.views import InFlightView

STORAGES = ("model", "fp8")


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
        rebase_sink: bool = False,
        storage: str = "model",
    ):
        if min(sink_frames, ring_frames) < 0 or scratch_frames <= 0:
            raise ValueError("sink/ring frames must be >= 0 and scratch frames > 0")
        if storage not in STORAGES:
            raise ValueError(f"KV cache storage must be one of {STORAGES}, not {storage!r}")
        self.rope, self.dtype, self.storage = rope, dtype, storage
        self.T = rope.tokens_per_frame
        self.S, self.R, self.Q = sink_frames, ring_frames, scratch_frames
        committed = (self.S + self.R) * self.T
        self.fp8 = None if storage == "model" else Fp8Frames(
            layers, batch, committed, heads, head_dim, committed + self.Q * self.T, dtype, device
        )  # fmt: skip
        # model storage: [committed slots | scratch]; fp8: the scratch alone (committed frames in self.fp8)
        slots = (0 if self.fp8 else committed) + self.Q * self.T
        shape = (layers, batch, slots, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rebase = rebase_sink and sink_frames > 0
        # the sink's keys at their true positions, to re-base from (only when it moves)
        sink_copy = self.S * self.T if self.rebase else 0
        self.sink_k = torch.zeros((layers, batch, sink_copy, heads, head_dim), dtype=dtype, device=device)
        self.commit_from: int | None = None
        """If set, committed frames keep this batch element's K/V in every element (MAGI-1's base
        guidance: the null-caption pass writes the cache both conditioned passes read)."""
        self.reset()

    # -- bookkeeping (host integers) -------------------------------------------------------

    @property
    def committed(self) -> int:
        """Frames committed so far: the next commit is this (absolute) frame."""
        return self._committed

    @committed.setter
    def committed(self, frames: int) -> None:
        # visible_frames is kept as an integer of its own: a compiled forward reads (and is
        # specialised on) it alone, which stops changing once the window is full
        self._committed = frames
        held = frames - self.origin
        self._visible = min(held, self.S) + min(max(held - self.S, 0), self.R)

    @property
    def visible_frames(self) -> int:
        """Committed frames a new call attends to (sink + the most recent ring frames)."""
        return self._visible

    def first_recent_frame(self) -> int:
        """Absolute index of the oldest committed frame still in the ring."""
        return max(self.origin + self.S, self.committed - self.R)

    def visible_frame_ids(self) -> list[int]:
        """Absolute indices of the visible committed frames, oldest first."""
        sink = list(range(self.origin, self.origin + min(self.committed - self.origin, self.S)))
        return sink + list(range(self.first_recent_frame(), self.committed))

    def slot_frames(self) -> list[int]:
        """The committed frame each visible slot holds, in slot order (the order of the keys a view
        attends to). Once the ring wraps this is not increasing: masks must follow it."""
        return sorted(self.visible_frame_ids(), key=self.slot_of)

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
        """Bytes of every buffer the cache holds (fp8: payload, scales and the working buffer too)."""
        own = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.sink_k))
        return own + (self.fp8.nbytes if self.fp8 else 0)

    def _scratch_start(self) -> int:
        """Token slot in `k`/`v` where the in-flight frames go: right after the visible committed
        frames, or (fp8: the committed frames live elsewhere) at the start."""
        return 0 if self.fp8 else self.visible_frames * self.T

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
    ) -> InFlightView:
        """A call over frames [first_frame, first_frame + frames), all computed here, whose first
        `commit_frames` frames (finished blocks) `commit()` writes to the cache after the forward."""
        if first_frame != self.committed:
            raise ValueError(f"the call starts at frame {first_frame} but {self.committed} frames are committed")
        if not 0 <= commit_frames <= frames:
            raise ValueError(f"cannot commit {commit_frames} of {frames} frames")
        if frames % block_frames or first_frame % block_frames:
            raise ValueError(f"frames {first_frame}..{first_frame + frames} are not whole blocks of {block_frames}")
        first = first_frame // block_frames
        blocks = list(range(first, first + frames // block_frames))
        return InFlightView(
            self, blocks, blocks, block_frames, mode, commits=commit_frames // block_frames, reach=reach
        )

    # -- a view's reads and writes, per layer ----------------------------------------------

    def write(self, layer: int, offset: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """In-flight K/V `[B, n, H, Dh]` of one layer into the scratch, from its token `offset` on."""
        start = self._scratch_start() + offset
        self.k[layer, :, start : start + keys.shape[1]] = keys
        self.v[layer, :, start : start + keys.shape[1]] = values

    def read(self, layer: int, inflight_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, N, H, Dh]` (model dtype) a view attends to at one layer: the visible
        committed frames in slot order, then the first `inflight_tokens` of the scratch."""
        committed = self.visible_frames * self.T
        if self.fp8 is None:  # already contiguous: a slice, no copy
            end = committed + inflight_tokens
            return self.k[layer, :, :end], self.v[layer, :, :end]
        scratch = slice(0, inflight_tokens)
        return self.fp8.read(layer, committed, self.k[layer, :, scratch], self.v[layer, :, scratch])

    # -- writes ------------------------------------------------------------------------------

    def append(self, first_frame: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Commit frames whose K/V were computed elsewhere: keys (rotated) / values `[L, B, n*T, H, Dh]`."""
        if first_frame != self.committed:
            raise ValueError(f"appending frame {first_frame} but {self.committed} frames are committed")
        frames = keys.shape[2] // self.T
        if frames > self.Q:
            raise ValueError(f"{frames} frames exceed the cache's scratch of {self.Q}")
        start = self._scratch_start()
        self.k[:, :, start : start + keys.shape[2]] = keys
        self.v[:, :, start : start + keys.shape[2]] = values
        self.commit_scratch(first_frame, frames)

    def _store_frame(self, src: int, dst: int) -> None:
        """Frame `src` of `k`/`v` (a scratch frame) into committed slot `dst`, every layer."""
        source, target = slice(src * self.T, (src + 1) * self.T), slice(dst * self.T, (dst + 1) * self.T)
        if self.fp8:
            self.fp8.put(target, self.k[:, :, source], self.v[:, :, source])
        elif src != dst:
            self.k[:, :, target], self.v[:, :, target] = self.k[:, :, source], self.v[:, :, source]

    def _share_frame(self, slot: int) -> None:
        span, source = slice(slot * self.T, (slot + 1) * self.T), self.commit_from
        if self.fp8:
            self.fp8.share(span, source)
            return
        self.k[:, :, span] = self.k[:, source : source + 1, span]
        self.v[:, :, span] = self.v[:, source : source + 1, span]

    def commit_scratch(self, first_frame: int, frames: int, offset: int = 0) -> None:
        """Commit `frames` frames whose K/V a forward wrote to the scratch from its frame `offset`
        on: copy them into their ring (and sink) slots. Called by the runtime after the forward,
        never during it: the forward still attends to the frames these copies evict."""
        if first_frame != self.committed:
            raise ValueError(f"committing frame {first_frame} but {self.committed} frames are committed")
        T, scratch = self.T, self._scratch_start() // self.T + offset
        for j in range(frames):
            frame, src = first_frame + j, scratch + j
            sink_slot = frame - self.origin
            if sink_slot < self.S and self.rebase:  # keep a copy rotated at its true position, to re-base later
                self.sink_k[:, :, sink_slot * T : (sink_slot + 1) * T] = self.k[:, :, src * T : (src + 1) * T]
            dst = self.slot_of(frame)
            if dst is not None:
                self._store_frame(src, dst)
            if dst is not None and self.commit_from is not None:
                self._share_frame(dst)
        self.committed += frames
        self._rebase_sink()

    def _rebase_sink(self) -> None:
        """Rotate the sink so that it sits right before the oldest visible ring frame."""
        base = self.first_recent_frame() - self.S - self.origin
        if not self.rebase or base == self._sink_base:
            return
        shift = self.rope.time_shift(base)
        sink = slice(0, self.S * self.T)
        for layer in range(self.k.shape[0]):
            keys = self.rope.apply(self.sink_k[layer], shift)
            if self.fp8:
                self.fp8.put_keys(layer, sink, keys)
            else:
                self.k[layer, :, sink] = keys
        self._sink_base = base
