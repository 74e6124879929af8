"""First-block cache: run the first layer, and skip the rest when its residual barely moved.

Per stream block and branch: the residual of layer 0 on the block's tokens (computed with the
block's real attention context: `Signals.first_block`) is compared with the residual at the
block's last computed step; `rel_l1 < threshold` reuses the block's last output, else the block
is computed and its residual becomes the new reference. No accumulation, as in ParaAttention and
diffusers' FirstBlockCache; the reference only moves on computed steps, so drift builds up
against it and forces a recompute.

Cost: deciding runs layer 0 on every candidate block (not on a block's last step, which always
computes); a computed block then runs all layers, layer 0 again (1/L extra).
`CacheStats.probe_flops` counts the probes.
"""

from __future__ import annotations

from cache.base import CachePolicy, Decision, StepInfo, relative_l1


class FBCache(CachePolicy):
    name = "fbcache"
    needs_probe = True

    def _decide(self, info: StepInfo, branch: int, signals) -> Decision:
        if info.last or self.threshold == 0:
            return Decision.COMPUTE
        slot = self._slot(info.block, branch)
        slot["current"] = signals.first_block(info.block)[branch]
        if self.protected(info) or "reference" not in slot:
            return Decision.COMPUTE
        if relative_l1(slot["current"], slot["reference"]) < self.threshold:
            del slot["current"]
            return Decision.REUSE
        return Decision.COMPUTE

    def computed(self, info: StepInfo, flow, features=None) -> None:
        super().computed(info, flow)
        for (block, _), slot in self.state.items():
            if block == info.block and "current" in slot:
                slot["reference"] = slot.pop("current")
