"""MAGI-1's special caption tokens: learned text-encoder-width vectors its run scripts prepend.

MAGI-1's released run scripts set PAD_HQ=1 and PAD_DURATION=1: every chunk's T5 caption states
get a "high quality" token and a "chunks remaining" token prepended (the duration token last, so
it comes first: [DURATION, HQ, caption ...]), cut to the caption length. The vectors ship with
MAGI-1's code as `special_tokens.npz`: `other_tokens` rows 1 (HQ) and 7..14 (duration n + 1 for
"n chunks remain", the last meaning 7 or more).

A stream is endless, so every chunk has 7 or more chunks to come: arcade prepends that duration
token to every chunk. (The scripts' finite videos give their last seven chunks the smaller counts.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HQ_ROW = 1
DURATION_ROWS = range(7, 15)
"""`other_tokens` rows of the duration tokens: row 7 + min(chunks remaining, 7)."""
ENDLESS = len(DURATION_ROWS) - 1
"""The duration token of a chunk with 7 or more chunks after it."""
KNOWN = ("hq", "duration")


@dataclass(frozen=True)
class SpecialTokens:
    hq: torch.Tensor
    """`[text_dim]`."""
    duration: torch.Tensor
    """`[8, text_dim]`: index n for n chunks remaining (7: seven or more)."""

    @classmethod
    def load(cls, path: Path) -> SpecialTokens:
        with np.load(path) as data:
            if "other_tokens" not in data:
                raise ValueError(f"{path}: no 'other_tokens' array (MAGI-1's special_tokens.npz has one)")
            rows = torch.from_numpy(data["other_tokens"].astype(np.float32))
        if rows.ndim != 2 or rows.shape[0] < DURATION_ROWS.stop:
            raise ValueError(f"{path}: other_tokens has shape {tuple(rows.shape)}, expected [>= 15, text_dim]")
        if not torch.isfinite(rows).all():
            raise ValueError(f"{path}: other_tokens holds NaN or inf")
        return cls(rows[HQ_ROW], rows[DURATION_ROWS.start : DURATION_ROWS.stop])

    @classmethod
    def random(cls, width: int, seed: int) -> SpecialTokens:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randn(DURATION_ROWS.stop, width, generator=generator)
        return cls(rows[HQ_ROW], rows[DURATION_ROWS.start : DURATION_ROWS.stop])

    @property
    def width(self) -> int:
        return self.hq.shape[-1]

    def prepend(self, states: torch.Tensor, length: int, names: tuple[str, ...]) -> tuple[torch.Tensor, int]:
        """States `[1, L, D]` with `length` real tokens -> the same with the tokens in front, in
        the scripts' order, cut to L; and the new number of real tokens."""
        for name in names:  # each goes in front of what is there: the last named ends up first
            token = self.hq if name == "hq" else self.duration[ENDLESS]
            states = torch.cat([token.to(states)[None, None], states], dim=1)[:, : states.shape[1]]
            length = min(length + 1, states.shape[1])
        return states, length
