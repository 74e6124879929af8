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

    def fork(self, stream: int) -> NoiseSource:
        """An independent source for a sub-stream (e.g. each segment of a long video)."""
        return NoiseSource(_splitmix64(_splitmix64(self.seed & _MASK64) ^ (stream + 0x5EED)) & ((1 << 63) - 1))

    def generator_seed(self, block: int, step: int) -> int:
        mixed = _splitmix64(_splitmix64(_splitmix64(self.seed & _MASK64) ^ block) ^ step)
        return mixed & ((1 << 63) - 1)

    def noise(self, shape: tuple[int, ...], block: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.generator_seed(block, step))
        sample = torch.randn(shape, generator=generator, dtype=torch.float32)
        if torch.device(device).type == "cuda":
            sample = sample.pin_memory()  # a pinned copy does not wait for the GPU's queue
        return sample.to(device, non_blocking=True)
