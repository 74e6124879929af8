"""What a model's self-attention asks of the runtime: the only runtime type the models see.

A model calls `view.context(layer, q, k, v)` once per layer with its un-rotated queries and keys
`[B, N, H, Dh]` and gets back the rotated queries, the keys and values to attend to (committed
frames, other in-flight blocks, its own) and an optional boolean mask (True: attend), `[N, N_keys]`
for every sample alike or `[B, 1, N, N_keys]` per sample (one forward of several streams, whose
key lengths differ: engine/runtime/coalesce.py), which SDPA broadcasts over heads; it hands the
attention output to `view.output(layer, out)` before its output projection (a sequence-parallel
view returns heads and tokens to where they were). Where the
keys come from (a KV cache, a peer rank, a stored step) is the view's business, not the model's.
`LocalView` (no committed context) lives here because sampling and training use it as well as
the runtime; the cache-backed views are in engine/runtime/views.py.
"""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionView(Protocol):
    def context(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rotated q `[B, N, H, Dh]`, keys `[B, M, H, Dh]`, values `[B, M, H, Dh]`, mask `[N, M]`,
        `[B, 1, N, M]` or None)."""
        ...

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The attention output `[B, N, H, Dh]` back in the layout the model's tokens are in (the
        identity, unless the view split tokens and heads differently around attention: Ulysses)."""
        ...


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

    Keys are the committed `context_frames` (absolute frame indices, in the order the keys are
    laid out), then the in-flight `blocks` in order; the queries are those of `queries` (default:
    every block). A block sees keys of blocks <= itself; with `reach`, block b sees only blocks
    b - reach[b] + 1 .. b (MAGI-1's per-chunk KV range, 1 for a committing chunk).
    Built per frame from host integers (nothing reads a tensor back), copied to the device without
    waiting on it, then expanded to tokens there.
    """
    queries = blocks if queries is None else queries
    key_blocks = [f // block_frames for f in context_frames] + [b for b in blocks for _ in range(block_frames)]
    lowest = {b: b - reach[b] + 1 if reach is not None else -1 for b in queries}
    rows = [[lowest[q] <= k <= q for k in key_blocks] for q in queries for _ in range(block_frames)]  # [F_q, F_k]
    if all(map(all, rows)):
        return None
    frames = torch.tensor(rows)
    if torch.device(device).type == "cuda":  # pinned + non-blocking: the copy does not wait for the GPU
        frames = frames.pin_memory()
    frames = frames.to(device, non_blocking=True)
    T, (F_q, F_k) = tokens_per_frame, frames.shape
    return frames[:, None, :, None].expand(F_q, T, F_k, T).reshape(F_q * T, F_k * T)


def check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")


class LocalView:
    """No committed context: the call's frames attend among themselves (block-causal or not)."""

    def __init__(self, rope, first_frame: int, frames: int, block_frames: int, mode: str, reach=None):
        check_mode(mode)
        if frames % block_frames:
            raise ValueError(f"{frames} frames do not split into blocks of {block_frames}")
        self.rope, self.rotation = rope, rope.tables(first_frame, frames)  # [N, Dh/2] complex
        first = first_frame // block_frames
        blocks = list(range(first, first + frames // block_frames))
        causal = mode == "causal"
        self.mask = block_mask([], blocks, block_frames, rope.tokens_per_frame, rope.device, reach) if causal else None

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.rope.apply(q, self.rotation), self.rope.apply(k, self.rotation), v, self.mask

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out
