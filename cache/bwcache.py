"""BWCache-style block-wise caching: reuse for a fixed period once the layers' outputs settle.

On each computed step of a stream block, the outputs of every transformer layer on the block's
tokens (taken by forward hooks: `FeatureTap`) are compared with those of the block's previous
computed step: `indicator = mean over layers of rel_l1(h_i, h_i_prev)`. When it falls below the
threshold the block reuses its last output for the next `reuse_period` steps (default 10% of the
steps, at least 1), then computes again and re-tests. Tail protection: once a block first
triggers at step k, reuse is allowed only in the first half of its remaining steps; the last
ones always compute (the U-shaped change curve rises again at the end).

BWCache's released code makes this decision per denoising step of the whole video; here it is
per stream block, like every arcade policy, so blocks at different noise levels do not share a
verdict. Guidance branches share one indicator (both rows of the layer outputs).
"""

from __future__ import annotations

import math

from cache.base import CachePolicy, Decision, StepInfo, relative_l1


class BWCache(CachePolicy):
    name = "bwcache"
    needs_features = True

    def __init__(self, threshold: float = 0.0, warmup: int = 1, reuse_period: int | None = None, steps: int = 4):
        super().__init__(threshold, warmup)
        self.reuse_period = reuse_period or max(1, round(0.1 * steps))

    def decide(self, infos: list[StepInfo], branches: int, signals) -> dict[tuple[int, int], Decision]:
        decisions = {}
        for info in infos:  # one verdict per block, shared by the branches (one indicator)
            decision = self._verdict(info)
            decisions.update({(info.block, br): decision for br in range(branches)})
        return decisions

    def _verdict(self, info: StepInfo) -> Decision:
        slot = self._slot(info.block, 0)
        if self.protected(info) or slot.get("reuse_left", 0) <= 0 or info.step >= slot.get("tail", info.steps):
            return Decision.COMPUTE
        slot["reuse_left"] -= 1
        return Decision.REUSE

    def computed(self, info: StepInfo, flow, features=None) -> None:
        super().computed(info, flow)
        slot = self._slot(info.block, 0)
        before, slot["features"] = slot.get("features"), features
        if before is None or features is None or self.threshold == 0:
            return
        indicator = sum(relative_l1(now, old) for now, old in zip(features, before)) / len(features)
        if indicator < self.threshold:
            slot["reuse_left"] = self.reuse_period
            if "tail" not in slot:  # first trigger at step k: steps from k + (S - k) / 2 on compute
                slot["tail"] = info.step + math.ceil((info.steps - info.step) / 2)
