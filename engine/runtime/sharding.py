"""How one forward's tokens are split over ranks: Ulysses sequence parallelism.

With `sp` ranks sharing each forward, the forward's token sequence (N = F*T tokens, frame-major,
T tokens per frame) is padded to a multiple of sp and cut into sp contiguous slices of n = N'/sp
tokens; rank r holds tokens r*n .. (r+1)*n, wherever frames begin and end. Every rank runs the
patch embedding and the per-frame conditioning on the whole latents (cheap: one small matmul
per token and one per frame), keeps its slice, and runs the blocks and head on it: modulation,
projections, norms, cross-attention and the FFN are per token. Conditioning that is constant
per frame reaches the slice as groups of tokens, each inside one frame (engine/models/tokens.py).

Around self-attention an all-to-all trades the slice for a group of heads (every token, H/sp
heads), so attention is exact and each rank's KV cache holds only its heads (memory per rank /
sp). Slices are contiguous, so the all-to-all delivers tokens in sequence order; the padding
(the last N' - N) is cut off before the attention view sees any query, key or value (it is never
attended to, and never reaches the cache), and put back as zeros before the all-to-all returns
the tokens. The head's output slices are gathered, the padding dropped, and the model unpatchifies
the whole: the solver sees whole latents, the same on every sp rank.

So sp must divide only the query heads and the key/value heads (GQA): any latent size runs.

`SeqExchange` is what parallel/ulysses.py supplies (the collectives); this file is the layout.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F


class SeqExchange(Protocol):
    size: int
    """Ranks sharing one forward (sp)."""

    def heads_for_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n, H, Dh]` (this rank's tokens, all heads) -> `[B, sp*n, H/sp, Dh]`: every rank's
        tokens, rank-major, for this rank's group of heads."""
        ...

    def tokens_for_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: `[B, sp*n, H/sp, Dh]` rank-major -> `[B, n, H, Dh]`."""
        ...

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x`, concatenated along `dim` in rank order."""
        ...

    @property
    def rank(self) -> int: ...


def refusal(sp: int, heads: int, kv_heads: int) -> str | None:
    """Why `sp` ranks cannot share a forward of a model with these heads (None: they can)."""
    if heads % sp == 0 and kv_heads % sp == 0:
        return None
    common = math.gcd(heads, kv_heads)
    fits = [str(d) for d in range(2, common + 1) if common % d == 0]
    fix = f"use --sp {' or '.join(fits)}" if fits else "this model runs without --sp"
    kv = f" and {kv_heads} key/value" if kv_heads != heads else ""
    return f"sp {sp} must divide the model's {heads} query{kv} heads: {fix}"


class Slice:
    """Rank `rank`'s share of a forward of `frames` frames of `tokens_per_frame` tokens."""

    def __init__(self, frames: int, tokens_per_frame: int, sp: int, rank: int):
        self.tokens = frames * tokens_per_frame  # N
        self.length = -(-self.tokens // sp)  # n = N' / sp, N' = N padded to a multiple of sp
        self.start = rank * self.length
        self.padded = sp * self.length
        # groups of g tokens, each inside one frame: g divides T and n (so every slice start too)
        group = math.gcd(tokens_per_frame, self.length)
        firsts = range(self.start, self.start + self.length, group)
        frame_of = [min(first // tokens_per_frame, frames - 1) for first in firsts]  # padding: the last frame's
        self.runs = [(f, len(list(same))) for f, same in itertools.groupby(frame_of)]  # (frame, groups)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N, ...]` -> this rank's `[B, n, ...]`, zero-padded past the sequence's end."""
        part = x[:, self.start : self.start + self.length]
        return _pad_tokens(part, self.length)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """`[B, m, ...]` -> `[B, length, ...]` with zeros after the m tokens."""
    if x.shape[1] == length:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]))


class Ulysses:
    """The sharding part: this rank's slice of a forward's tokens, and attention views that trade
    it for a group of heads."""

    def __init__(self, exchange: SeqExchange):
        self.exchange, self.size = exchange, exchange.size

    def check(self, heads: int, kv_heads: int) -> None:
        """Refuse a split into unequal head groups (any token count runs: slices are padded)."""
        why = refusal(self.size, heads, kv_heads)
        if why:
            raise ValueError(why)

    def slice(self, frames: int, tokens_per_frame: int) -> Slice:
        return Slice(frames, tokens_per_frame, self.size, self.exchange.rank)

    def gather(self, out: torch.Tensor, part: Slice) -> torch.Tensor:
        """Every rank's `[B, n, ...]` -> the whole sequence `[B, N, ...]` (padding dropped)."""
        return self.exchange.gather(out.contiguous(), dim=1)[:, : part.tokens]

    def view(self, inner, part: Slice) -> UlyssesView:
        return UlyssesView(inner, self.exchange, part)


class UlyssesView:
    """Wraps any attention view: all-to-all in front of it, and back after the attention."""

    def __init__(self, inner, exchange: SeqExchange, part: Slice):
        self.inner, self.exchange, self.part = inner, exchange, part

    def __getattr__(self, name: str):  # the runtime still talks to the inner view (commit, records ...)
        return getattr(self.inner, name)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, n, H, Dh] (this rank's tokens) -> [B, N, H/sp, Dh]: every token in order, padding cut off
        return self.exchange.heads_for_tokens(x.contiguous())[:, : self.part.tokens]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, H/sp, Dh] -> [B, n, H, Dh] (this rank's tokens; its padding comes back as zeros)
        return self.exchange.tokens_for_heads(_pad_tokens(x, self.part.padded).contiguous())

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.inner.context(layer, self.to_heads(q), self.to_heads(k), self.to_heads(v))

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return self.to_tokens(self.inner.output(layer, out))


class ShardedModel:
    """The model as the loop sees it when `sp` ranks share each forward: same call, whole latents
    in and out; inside, every rank runs the blocks on its slice of the tokens (other attributes
    are the model's own). `context()`: what the forward runs inside (the attention kernel choice)."""

    def __init__(self, model, ulysses: Ulysses, tokens_per_frame: int, context: Callable = contextlib.nullcontext):
        self.model, self.ulysses, self.tokens_per_frame, self.context = model, ulysses, tokens_per_frame, context

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, text, view, **kwargs) -> torch.Tensor:
        part = self.ulysses.slice(latents.shape[2], self.tokens_per_frame)
        with self.context():
            whole = self.model.enter(latents, sigma, text, **kwargs)  # [B, N, dim], groups per frame
            mine = whole.regrouped(part.take(whole.x), part.runs)  # [B, n, dim], groups inside frames
            out = self.model.run(mine, text, self.ulysses.view(view, part))  # [B, n, C*ph*pw]
            return self.model.leave(self.ulysses.gather(out, part), latents.shape)
