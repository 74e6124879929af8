"""How a tick's forward turns into flows: the guidance of a model family.

The executor hands a guidance object the tick's members and their inputs; it runs the model one
or more times and returns the guided flow of every member's frames. Wan-family models use
classifier-free guidance (here); MAGI-1's three-pass guidance lives in engine/magi.py.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engine.models.attention import AttentionView


class Guidance(Protocol):
    branches: int
    """Batch elements the forward that writes the KV cache runs with (the cache's batch)."""

    def __call__(
        self, executor, members, x: torch.Tensor, sigma: torch.Tensor, text, view: AttentionView
    ) -> torch.Tensor:
        """x `[1, C, F, H, W]`, sigma `[1, F]` float64 -> guided flow `[1, C, F, H, W]` float32.
        The runtime commits the view's K/V afterwards; guidance only runs the model."""
        ...


class ClassifierFree:
    """cond and uncond batched in one forward: flow = uncond + g * (cond - uncond); g = 1: cond only."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.branches = 2 if scale > 1.0 else 1

    def __call__(self, executor, members, x, sigma, text, view) -> torch.Tensor:
        x, sigma = self.batched(x, sigma)
        return self.combine(executor.model(x, sigma, text, view, fps=executor.fps))

    def batched(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs: x `[1, C, F, H, W]`, sigma `[1, F]` -> `[branches, ...]` each (cond, uncond).
        A forward shared by many streams stacks these along the batch (engine/runtime/coalesce.py)."""
        if self.branches == 2:
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        return x, sigma.expand(x.shape[0], -1)

    def combine(self, flow: torch.Tensor) -> torch.Tensor:
        """The model's flow `[branches, C, F, H, W]` -> the guided flow `[1, C, F, H, W]`."""
        if self.branches == 1:
            return flow
        cond, uncond = flow.chunk(2)
        return uncond + self.scale * (cond - uncond)
