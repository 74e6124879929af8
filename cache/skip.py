"""Feature caching as the executor's skip part: each tick, a policy decides per working block
whether it runs.

Before the forward the policy sees every working block (and guidance branch) and answers compute,
reuse or predict. Only computed blocks (and committing ones) go into the forward: a skipped
block's tokens are dropped from it entirely, and the blocks that are computed attend to it through
the K/V of its last computed step (the executor keeps them because `records` is set), so the
tick's attention layout stays that of the one forward over all blocks. A skipped block's flow
comes from the policy; the solver steps it as usual. When every block computes this is the plain
executor, value for value.

The policy covers the blocks this process owns: on a cascade rank its decisions need no
communication, and with lagged context a skipped block's neighbours keep seeing its last K/V.
"""

from __future__ import annotations

import contextlib

import torch

from cache.base import CachePolicy, CacheStats, Decision, StepInfo
from cache.signals import FeatureTap, Signals
from engine.families import forward_flops
from engine.plan.sigmas import TRAIN_TIMESTEPS
from engine.plan.timeline import Tick, Work


class CacheSkip:
    records = True

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.configured = policy.threshold
        self.stats = CacheStats()
        self._infos: list[StepInfo] = []
        self._chosen: dict[int, Decision] = {}
        self._features: dict[int, list[torch.Tensor]] = {}

    @property
    def shares_forward(self) -> bool:
        """Decisions are made before the forward; only per-layer features are read inside it."""
        return not self.policy.needs_features

    def _info(self, ex, work: Work) -> StepInfo:
        return StepInfo(work.block, work.step, work.steps, work.t_in / TRAIN_TIMESTEPS, work.sigma_out)

    def choose(self, ex, tick: Tick, members, text):
        work = {w.block: w for w in tick.work if not w.commit and ex.placement.owns(w.block)}
        self._infos = [self._info(ex, work[b]) for b, _, _ in members if b in work]
        branches = ex.guidance.branches
        signals = Signals(ex, [b for b, _, _ in members], {b: (x, t) for b, x, t in members}, text, branches)
        self._chosen = self._decisions(ex, signals, branches)
        run = [m for m in members if self._chosen.get(m[0], Decision.COMPUTE) == Decision.COMPUTE]
        self._account(ex, len(run), len(members) - len(run), len(members), text)
        self.stats.probe_flops += signals.probe_flops
        return run

    def _decisions(self, ex, signals: Signals, branches: int) -> dict[int, Decision]:
        """One decision per block: computed if either branch asks; blocks with nothing cached compute."""
        if not self._infos:
            return {}
        per_branch = self.policy.decide(self._infos, branches, signals)
        chosen = {}
        for info in self._infos:
            decision = max(per_branch[(info.block, br)] for br in range(branches))
            cached = info.block in self.policy.history and info.block in ex.inflight
            chosen[info.block] = decision if cached else Decision.COMPUTE
        return chosen

    @contextlib.contextmanager
    def observe(self, ex, blocks: list[int]):
        """Around a forward: the per-layer features of its blocks, for policies that read them."""
        if not self.policy.needs_features:
            yield
            return
        tap = FeatureTap(ex.model)
        try:
            yield
        finally:
            tap.close()
        tokens = ex.frames_per_block * ex.cache.T
        self._features.update(tap.take({b: slice(i * tokens, (i + 1) * tokens) for i, b in enumerate(blocks)}))

    def after(self, ex, tick: Tick, run, flows: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        skipped = {}
        for info in self._infos:
            decision = self._chosen[info.block]
            self.stats.add(info.block, decision)
            if decision == Decision.COMPUTE:
                self.policy.computed(info, flows[info.block], self._features.pop(info.block, None))
            else:
                skipped[info.block] = self.policy.output(info, decision)
        return skipped

    def end_tick(self, ex, tick: Tick) -> None:
        for work in tick.work:
            if work.last:
                self.policy.release(work.block)

    def _account(self, ex, computed: int, skipped: int, in_flight: int, text) -> None:
        """Analytic FLOPs of the computed blocks and of those skipped (as if they had run)."""
        tokens = ex.frames_per_block * ex.cache.T
        keys = ex.cache.visible_frames * ex.cache.T + in_flight * tokens
        cfg, branches = ex.model.cfg, ex.guidance.branches
        self.stats.flops_computed += forward_flops(cfg, computed * tokens, keys, text.tokens) * branches
        self.stats.flops_saved += forward_flops(cfg, skipped * tokens, keys, text.tokens) * branches

    def counts(self) -> dict[str, int]:
        return self.stats.counts()

    def set_fidelity(self, threshold: float | None) -> None:
        """Raising the threshold skips more block-steps (lower fidelity, less compute); the session
        scheduler sets it per stream and round within a measured quality floor."""
        self.policy.threshold = self.configured if threshold is None else threshold
