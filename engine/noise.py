"""Seeded noise for one stream, addressed by (block, step) rather than by draw order.

A seed must fix the whole video whatever executes the plan: one device block by block, several
blocks side by side, or one block per rank. So each (block, step) pair gets its own generator,
seeded from a hash of (seed, block, step); the order in which noise is requested never matters.
Noise is drawn on the CPU in float32 so that every device and dtype sees the same numbers.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class NoiseSource:
    """`noise(shape, block, step)`: standard normal, identical for the same (seed, block, step)."""

    def __init__(self, seed: int):
        self.seed = seed

    def generator_seed(self, block: int, step: int) -> int:
        mixed = _splitmix64(_splitmix64(_splitmix64(self.seed & _MASK64) ^ block) ^ step)
        return mixed & ((1 << 63) - 1)

    def noise(self, shape: tuple[int, ...], block: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.generator_seed(block, step))
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, non_blocking=True)
