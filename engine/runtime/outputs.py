"""Plain records the runtime hands around: finished blocks, in-flight K/V, run statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class Block:
    """A finished block: index, first latent frame, clean latents `[B, C, F, H, W]` (float32)."""

    index: int
    first_frame: int
    latents: torch.Tensor


@dataclass
class BlockKV:
    """One block's K/V for every layer: keys (rotated) and values `[L, B, F*T, H, Dh]`."""

    keys: torch.Tensor
    values: torch.Tensor

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]


@dataclass
class RunStats:
    """What one stream's executor did. Counts per shape keep an endless stream's stats bounded."""

    ticks: int = 0
    forwards: int = 0
    frames: int = 0
    """Latent frames run through the model (per branch), summed over forwards."""
    calls: Counter[tuple[int, int]] = field(default_factory=Counter)
    """How many forwards ran with each (query frames, key frames): what their cost depends on."""
    recaches: int = 0
    """Forwards that rewrote the committed window under a new prompt (recache switch)."""
    skip: dict[str, int] = field(default_factory=dict)
    """The skip part's counts (feature caching: block-steps computed / reused / predicted, FLOPs
    computed / saved / spent probing); empty without one."""

    def count(self, frames: int, key_frames: int) -> None:
        self.forwards += 1
        self.frames += frames
        self.calls[(frames, key_frames)] += 1

    @property
    def hit_rate(self) -> float | None:
        """Share of block-steps a skip part did not compute (None without one)."""
        if not self.skip:
            return None
        skipped = self.skip["reused"] + self.skip["predicted"]
        done = skipped + self.skip["computed"]
        return skipped / done if done else 0.0

    @property
    def flops_saved_share(self) -> float | None:
        if not self.skip:
            return None
        spent = self.skip["flops_computed"] + self.skip["probe_flops"]
        total = spent + self.skip["flops_saved"]
        return self.skip["flops_saved"] / total if total else 0.0

    def skip_summary(self) -> dict | None:
        """The counts and shares a user reads (None without a skip part)."""
        if not self.skip:
            return None
        counts = {k: self.skip[k] for k in ("computed", "reused", "predicted")}
        return {**counts, "hit_rate": round(self.hit_rate, 4), "flops_saved_share": round(self.flops_saved_share, 4)}

    def merged(self, other: RunStats) -> RunStats:
        """Two executors' stats as one (SkyReels-V2 runs one executor per segment)."""
        skip = {k: self.skip.get(k, 0) + v for k, v in other.skip.items()}
        return RunStats(self.ticks + other.ticks, self.forwards + other.forwards, self.frames + other.frames,
                        self.calls + other.calls, self.recaches + other.recaches, skip)  # fmt: skip
