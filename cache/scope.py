"""SCOPE-style tri-modal caching: reuse, predict (Taylor in noise level) or recompute.

SCOPE's full text was not available; this is our reading of its abstract, with every open detail
chosen here and measured by `python -m launch.bench cache`:
* indicator: FlowCache's per-block accumulated relative change of the patch-embedded input;
* `acc + rel < threshold` -> reuse the last output; `< predict_factor * threshold` -> predict
  by first-order Taylor extrapolation in the block's noise level from its last two computed
  outputs, F(s) = F(a) + (s - a) (F(a) - F(b)) / (a - b); otherwise recompute and reset;
* stability controls: at most `max_predictions` predicted or reused steps in a row before a
  forced recompute; no prediction before two computed steps exist; an error guard that
  recomputes instead of predicting when the last two computed outputs differ by more than
  `guard` (relative L1), where a straight line through them is not to be trusted; the first
  `warmup` steps and the last step of each block always compute.
Selective computation (only blocks with work run) is the executor's, as everywhere in arcade.
"""

from __future__ import annotations

from cache.base import Decision, StepInfo, relative_l1
from cache.flowcache import FlowCache


class Scope(FlowCache):
    name = "scope"

    def __init__(
        self,
        threshold: float = 0.0,
        warmup: int = 1,
        predict_factor: float = 3.0,
        max_predictions: int = 2,
        guard: float = 0.5,
        dim: int = 0,
    ):
        super().__init__(threshold, warmup, "magi", dim)
        self.predict_factor, self.max_predictions, self.guard = predict_factor, max_predictions, guard

    def _decide(self, info: StepInfo, branch: int, signals) -> Decision:
        if self.threshold == 0:
            return Decision.COMPUTE
        slot = self._slot(info.block, branch)
        change = self.change(info, branch, signals)
        skipped = slot.get("skipped", 0)
        if self.protected(info) or change is None or skipped >= self.max_predictions:
            return self._recompute(slot)
        acc = slot.get("acc", 0.0) + change
        if acc < self.threshold:
            decision = Decision.REUSE
        elif acc < self.predict_factor * self.threshold and self.can_predict(info) and self._trusted(info):
            decision = Decision.PREDICT
        else:
            return self._recompute(slot)
        slot["acc"], slot["skipped"] = acc, skipped + 1
        return decision

    @staticmethod
    def _recompute(slot: dict) -> Decision:
        slot["acc"], slot["skipped"] = 0.0, 0
        return Decision.COMPUTE

    def _trusted(self, info: StepInfo) -> bool:
        (_, older), (_, newer) = self.history[info.block]
        return relative_l1(newer, older) <= self.guard
