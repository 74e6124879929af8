"""TeaCache: one decision per forward from the timestep-modulated input of the first layer.

`acc += poly(rel_l1(m_t, m_prev))` where m is block 0's modulated self-attention input over the
whole forward (all in-flight blocks together) and poly is the model's fitted rescaling; while
`acc < threshold` every block reuses its last output, else everything is computed and acc resets.
This is TeaCache as published (one state per guidance branch, not per stream block), the
baseline FlowCache argues against for autoregressive video: blocks at different noise levels
share one decision. Blocks that have nothing cached (a block's first step) always compute.

Choices: the signal is compared with the previous tick's signal of the same blocks (blocks that
joined or left are dropped from both), and `warmup` ticks of each block are computed.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.base import CachePolicy, Decision, StepInfo, relative_l1

# TeaCache's fitted rescaling for Wan2.1 with use_ret_steps (coefficients, highest power first)
WAN_COEFFICIENTS = {
    1536: (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    5120: (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
}


def rescaler(dim: int):
    """The fitted polynomial for a Wan width, or identity for models it was not fitted on."""
    coefficients = WAN_COEFFICIENTS.get(dim)
    return np.poly1d(coefficients) if coefficients else (lambda x: x)


class TeaCache(CachePolicy):
    name = "teacache"

    def __init__(self, threshold: float = 0.0, warmup: int = 1, dim: int = 0):
        super().__init__(threshold, warmup)
        self.rescale = rescaler(dim)
        self.accumulated = [0.0, 0.0]
        self.previous: dict[int, torch.Tensor] = {}

    def decide(self, infos: list[StepInfo], branches: int, signals) -> dict[tuple[int, int], Decision]:
        current = {i.block: signals.modulated(i.block) for i in infos}
        shared = [b for b in current if b in self.previous]
        everyone = Decision.COMPUTE
        if shared and not any(self.protected(i) for i in infos if i.block in shared):
            now = torch.cat([current[b] for b in shared], 1)
            change = relative_l1(now, torch.cat([self.previous[b] for b in shared], 1))
            everyone = Decision.REUSE
            for branch in range(branches):  # the branches see the same signal here
                self.accumulated[branch] += float(self.rescale(change))
                if self.accumulated[branch] >= self.threshold:
                    everyone = Decision.COMPUTE
        if everyone == Decision.COMPUTE:
            self.accumulated = [0.0, 0.0]
        self.previous = current
        return {
            (i.block, br): Decision.COMPUTE if self.protected(i) else everyone for i in infos for br in range(branches)
        }

    def release(self, block: int) -> None:
        super().release(block)
        self.previous.pop(block, None)
