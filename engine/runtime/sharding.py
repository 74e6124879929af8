"""How one block's tokens are split over ranks: Ulysses sequence parallelism inside a forward.

With `sp` ranks sharing each forward, every rank runs the model on a stripe of every frame's
latent rows (1/sp of the tokens): patch embedding, modulation, projections, norms, cross-attention,
the FFN and the head see only the stripe. Around self-attention an all-to-all trades the stripe
for a group of heads (every token, H/sp heads), so attention is exact and each rank's KV cache
holds only its heads (memory per rank / sp). After attention a second all-to-all gives the
tokens back, and the forward's output stripes are gathered, so the solver sees whole latents
(the same on every sp rank).

Token order. Frames are split by latent rows, so rank r holds tokens r*T/sp .. (r+1)*T/sp of every
frame (T tokens per frame). An all-to-all delivers them rank-major; `to_heads` puts them back in
frame order ([frame, rank, token]), which is the order rotary tables, masks and the KV cache use.

`SeqExchange` is what parallel/ulysses.py supplies (the collectives); this file is the layout.
"""

from __future__ import annotations

from typing import Protocol

import torch


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


class Ulysses:
    """The sharding part: split latents into row stripes, and attention views into head groups."""

    def __init__(self, exchange: SeqExchange, patch_rows: int):
        self.exchange, self.size, self.patch_rows = exchange, exchange.size, patch_rows

    def check(self, height: int, heads: int, kv_heads: int) -> None:
        """Refuse a split the layout cannot make: whole token rows and whole head groups per rank."""
        rows = height // self.patch_rows
        if rows % self.size:
            raise ValueError(f"sp {self.size} must divide the {rows} token rows of a frame")
        if heads % self.size or kv_heads % self.size:
            raise ValueError(f"sp {self.size} must divide the {heads} query and {kv_heads} key/value heads")

    def split_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` -> this rank's stripe `[B, C, F, H/sp, W]`."""
        stripe = latents.shape[3] // self.size
        return latents[:, :, :, self.exchange.rank * stripe : (self.exchange.rank + 1) * stripe]

    def gather_rows(self, stripe: torch.Tensor) -> torch.Tensor:
        return self.exchange.gather(stripe.contiguous(), dim=3)

    def view(self, inner, tokens_per_frame: int) -> UlyssesView:
        return UlyssesView(inner, self.exchange, tokens_per_frame)


class UlyssesView:
    """Wraps any attention view: all-to-all in front of it, and back after the attention."""

    def __init__(self, inner, exchange: SeqExchange, tokens_per_frame: int):
        self.inner, self.exchange, self.T = inner, exchange, tokens_per_frame

    def __getattr__(self, name: str):  # the runtime still talks to the inner view (commit, records ...)
        return getattr(self.inner, name)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, F*T/sp, H, Dh] -> [B, F*T, H/sp, Dh], tokens in frame order
        sp, stripe = self.exchange.size, self.T // self.exchange.size
        y = self.exchange.heads_for_tokens(x.contiguous())  # [B, sp * F*T/sp, H/sp, Dh], rank-major
        B, _, H, Dh = y.shape
        frames = x.shape[1] // stripe
        return y.view(B, sp, frames, stripe, H, Dh).transpose(1, 2).reshape(B, frames * self.T, H, Dh)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # [B, F*T, H/sp, Dh] in frame order -> [B, F*T/sp, H, Dh] (this rank's stripe)
        sp, stripe = self.exchange.size, self.T // self.exchange.size
        B, N, H, Dh = x.shape
        frames = N // self.T
        rank_major = x.view(B, frames, sp, stripe, H, Dh).transpose(1, 2).reshape(B, N, H, Dh)
        return self.exchange.tokens_for_heads(rank_major.contiguous())

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.inner.context(layer, self.to_heads(q), self.to_heads(k), self.to_heads(v))

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return self.to_tokens(self.inner.output(layer, out))


class ShardedModel:
    """The model as the loop sees it when `sp` ranks share each forward: same call, whole latents
    in and out; inside, every rank runs its stripe (other attributes are the model's own)."""

    def __init__(self, model, ulysses: Ulysses, tokens_per_frame: int):
        self.model, self.ulysses, self.tokens_per_frame = model, ulysses, tokens_per_frame

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, text, view, **kwargs) -> torch.Tensor:
        stripe = self.ulysses.split_rows(latents)
        out = self.model(stripe, sigma, text, self.ulysses.view(view, self.tokens_per_frame), **kwargs)
        return self.ulysses.gather_rows(out)
