"""The executor with feature caching: each tick, a policy decides per working block whether it runs.

Per tick: the policy sees every working block (and guidance branch) and answers compute, reuse
or predict. Only computed blocks (and committing ones) go into the forward: a skipped block's
tokens are dropped from it entirely, and the blocks that are computed attend to it through the
K/V of its last computed step (`SparseView`), so the tick's attention layout stays that of the
one forward over all blocks. A skipped block's flow comes from the policy; the solver steps it as
usual. When every block computes this is the plain executor, value for value.

The policy and the stored K/V belong to this executor: on a cascade rank they hold that rank's
blocks only, so decisions need no communication.
"""

from __future__ import annotations

import torch

from cache.base import CachePolicy, CacheStats, Decision, StepInfo
from cache.signals import FeatureTap, Signals
from cache.view import SparseView
from engine.models.flops import forward_flops
from engine.models.wan import TextKV
from engine.plan.sigmas import TRAIN_TIMESTEPS
from engine.plan.timeline import Tick, Work
from engine.runtime.executor import Executor
from engine.runtime.lagged import BlockKV


class CachingExecutor(Executor):
    def __init__(self, *args, policy: CachePolicy, **kwargs):
        super().__init__(*args, **kwargs)
        if self.compute != "selective":
            raise ValueError("feature caching needs selective computation (a KV cache)")
        self.policy = policy
        self.stored: dict[int, BlockKV] = {}
        """K/V of each in-flight block's last computed step: what others attend to while it is skipped."""
        self.cache_stats = CacheStats()

    @property
    def branches(self) -> int:
        return self.guidance.branches

    def _info(self, work: Work) -> StepInfo:
        return StepInfo(work.block, work.step, self.schedule.steps, work.t_in / TRAIN_TIMESTEPS, work.sigma_out)

    def _compute(self, tick: Tick, text: TextKV) -> dict[int, torch.Tensor]:
        members = self._selective_members(tick)
        work = {w.block: w for w in tick.work if not w.commit and self.owns(w.block)}
        infos = [self._info(work[b]) for b, _, _ in members if b in work]
        signals = Signals(self, [b for b, _, _ in members], {b: (x, t) for b, x, t in members}, text, self.branches)
        chosen = self._decisions(infos, signals)
        run = [m for m in members if chosen.get(m[0], Decision.COMPUTE) == Decision.COMPUTE]
        self._account(len(run), len(members) - len(run), len(members), text)
        flows, features = self._run(tick, members, run, text)
        self.cache_stats.probe_flops += signals.probe_flops
        for info in infos:
            decision = chosen[info.block]
            self.cache_stats.add(info.block, decision)
            if decision == Decision.COMPUTE:
                self.policy.computed(info, flows[info.block], features.get(info.block))
            else:
                flows[info.block] = self.policy.output(info, decision)
        return flows

    def _decisions(self, infos: list[StepInfo], signals: Signals) -> dict[int, Decision]:
        """One decision per block: computed if either branch asks; blocks with nothing cached compute."""
        if not infos:
            return {}
        per_branch = self.policy.decide(infos, self.branches, signals)
        chosen = {}
        for info in infos:
            decision = max(per_branch[(info.block, br)] for br in range(self.branches))
            cached = info.block in self.policy.history and info.block in self.stored
            chosen[info.block] = decision if cached else Decision.COMPUTE
        return chosen

    def _run(self, tick: Tick, members, run, text: TextKV) -> tuple[dict[int, torch.Tensor], dict]:
        """One forward over the computed blocks (none: nothing to do on one device)."""
        if not run:
            return {}, {}
        blocks, computed = [b for b, _, _ in members], [b for b, _, _ in run]
        commits = sum(1 for b in computed if b not in self.noisy)
        reach = self.reach(tick, blocks)
        view = SparseView(
            self.cache, blocks, computed, self.stored, self.frames_per_block, self.attention, commits, reach
        )
        return self._forward_recorded(view, run, text, len(view.present))

    def _forward_recorded(self, view, run, text: TextKV, in_view: int) -> tuple[dict[int, torch.Tensor], dict]:
        """Run the forward; keep the computed blocks' K/V (and layer outputs if the policy reads them)."""
        computed = [b for b, _, _ in run]
        tap = FeatureTap(self.model) if self.policy.needs_features else None
        try:
            flows = self._forward(run, text, view)
        finally:
            if tap is not None:
                tap.close()
        tokens = self.frames_per_block * self.cache.T
        features = tap.take({b: slice(i * tokens, (i + 1) * tokens) for i, b in enumerate(computed)}) if tap else {}
        for block, kv in view.recorded().items():
            if block in self.noisy:  # still denoising: others may attend to it while it is skipped
                self.stored[block] = kv
        self._count(len(run), view.scratch_slot + (in_view - len(run)) * self.frames_per_block)
        return flows, features

    def _account(self, computed: int, skipped: int, in_flight: int, text: TextKV) -> None:
        """Analytic FLOPs of the computed blocks and of those skipped (as if they had run)."""
        tokens = self.frames_per_block * self.cache.T
        keys = self.cache.visible_frames * self.cache.T + in_flight * tokens
        cfg, text_tokens = self.model.cfg, text.tokens
        self.cache_stats.flops_computed += forward_flops(cfg, computed * tokens, keys, text_tokens) * self.branches
        self.cache_stats.flops_saved += forward_flops(cfg, skipped * tokens, keys, text_tokens) * self.branches

    def _forget(self, tick: Tick) -> None:
        super()._forget(tick)
        for work in tick.work:
            if work.commit:
                self.stored.pop(work.block, None)
            elif work.step == self.schedule.steps - 1:
                self.policy.release(work.block)
