"""FlowCache: every stream block keeps its own cache decisions (chunk-wise caching).

Per stream block and branch, after the block's first `warmup` steps:
`rel = rel_l1(signal_now, signal_previous_step)`; if `acc + rel < threshold` the block reuses its
last output and `acc += rel`, else it is computed and `acc` resets. The block's last step always
computes; its state goes when it finishes.

Two variants, after the two released implementations:
* `magi` (default): the signal is the block's patch-embedded noisy input (content-based, no
  rescaling), as FlowCache's MAGI-1 code does; thresholds around 0.01-0.015 there.
* `skyreels`: the signal is block 0's timestep-modulated input for the block, rescaled by
  TeaCache's Wan polynomial, as FlowCache's SkyReels-V2 code does (per-group TeaCache); its
  released thresholds are 0.1 / 0.15 with 4-5 warmup steps. This signal depends only on the
  block's noise level, so on a given plan it fixes a reuse pattern per step.
What is reused: the velocity of the block's last computed step (MAGI-1's code re-applies the
last latent update; for Euler steps that is this velocity times the previous step size).
"""

from __future__ import annotations

from cache.base import CachePolicy, Decision, StepInfo, relative_l1
from cache.teacache import rescaler

VARIANTS = ("magi", "skyreels")


class FlowCache(CachePolicy):
    name = "flowcache"

    def __init__(self, threshold: float = 0.0, warmup: int = 1, variant: str = "magi", dim: int = 0):
        super().__init__(threshold, warmup)
        if variant not in VARIANTS:
            raise ValueError(f"flowcache variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.rescale = rescaler(dim) if variant == "skyreels" else (lambda x: x)

    def signal(self, info: StepInfo, signals):
        return signals.embedded(info.block) if self.variant == "magi" else signals.modulated(info.block)

    def change(self, info: StepInfo, branch: int, signals) -> float | None:
        """The rescaled relative change of the block's signal since its previous step."""
        slot = self._slot(info.block, branch)
        now, before = self.signal(info, signals), slot.get("signal")
        slot["signal"] = now
        return None if before is None else float(self.rescale(relative_l1(now, before)))

    def _decide(self, info: StepInfo, branch: int, signals) -> Decision:
        if self.threshold == 0:
            return Decision.COMPUTE
        slot = self._slot(info.block, branch)
        change = self.change(info, branch, signals)
        if self.protected(info) or change is None:
            slot["acc"] = 0.0
            return Decision.COMPUTE
        if slot.get("acc", 0.0) + change < self.threshold:
            slot["acc"] = slot.get("acc", 0.0) + change
            return Decision.REUSE
        slot["acc"] = 0.0
        return Decision.COMPUTE
