"""A forward's tokens between the patch embedding and the head, with what conditions them.

Both model families work per token except for conditioning that is constant over a latent frame
(Wan's modulation, MAGI-1's gates and its clean-chunk caption choice). `Tokens` carries the
token stream `x [B, N, dim]` and that conditioning per *group* of tokens: G groups of N/G
consecutive tokens, each tensor of `per_group` `[B, G, ...]` and each tuple of `flags` of length
G. A model's own forward makes one group per latent frame. A wrapper that runs a slice of the
tokens (sequence parallelism, engine/runtime/sharding.py) hands the model `regrouped` tokens
whose groups are pieces of frames, so a slice may start and end anywhere in a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokens:
    x: torch.Tensor
    """`[B, N, dim]` float32: the token stream."""
    per_group: tuple[torch.Tensor, ...]
    """Conditioning tensors `[B, G, ...]`, one row per group of N/G consecutive tokens."""
    flags: tuple[tuple[bool, ...], ...] = ()
    """Host flags per group (MAGI-1: whether the group's frame is a committed clean chunk)."""

    @property
    def groups(self) -> int:
        return self.per_group[0].shape[1]

    def regrouped(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> Tokens:
        """Other tokens `x [B, n, dim]`, in groups taken from this object's: `runs` lists
        (group, repeats) in order, so row j of the result conditions the j-th n/G' tokens of `x`.
        Built from slices and expands (no index tensor is copied to the device)."""

        def take(t: torch.Tensor) -> torch.Tensor:
            pieces = [t[:, g : g + 1].expand(t.shape[0], count, *t.shape[2:]) for g, count in runs]
            return torch.cat(pieces, dim=1)

        flags = tuple(tuple(f[g] for g, count in runs for _ in range(count)) for f in self.flags)
        return Tokens(x, tuple(take(t) for t in self.per_group), flags)
