"""What every cache policy shares: decisions, per-block state, the cached outputs, statistics.

A policy is asked, before each forward, what to do with every working stream block and guidance
branch: `COMPUTE` (run it), `REUSE` (take its output from its last computed step) or `PREDICT`
(extrapolate its output from its last two computed steps in noise level). The unit cached is a
block's flow as the solver receives it (after guidance): for a flow-matching model the velocity
changes slowly along a trajectory, so reusing it is the velocity form of FlowCache's "re-apply
the last update" (the update itself scales with the step size; the velocity does not).

Guidance branches keep separate indicator state (their signals differ), but they share one
forward: a block runs when either branch asks for it, and then both get fresh outputs. Because
guidance is linear in the two branches, reusing or extrapolating the guided flow equals doing so
per branch and combining.

State is keyed by (stream block, branch) and dropped when the block finishes its last step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Decision(enum.IntEnum):
    REUSE = 0
    PREDICT = 1
    COMPUTE = 2


@dataclass(frozen=True)
class StepInfo:
    """One working block at one tick: its step of `steps`, entering at `sigma` (1 = noise)."""

    block: int
    step: int
    steps: int
    sigma: float
    sigma_next: float

    @property
    def last(self) -> bool:
        return self.step == self.steps - 1


@dataclass
class BlockStats:
    computed: int = 0
    reused: int = 0
    predicted: int = 0


RECENT_BLOCKS = 64


@dataclass
class CacheStats:
    """Decisions per stream block (after merging branches; the most recent RECENT_BLOCKS, older
    ones folded into `earlier` so endless streams stay bounded) and in total; FLOPs saved."""

    blocks: dict[int, BlockStats] = field(default_factory=dict)
    earlier: BlockStats = field(default_factory=BlockStats)
    flops_computed: int = 0
    flops_saved: int = 0
    probe_flops: int = 0
    """FLOPs spent deciding (fbcache's first-layer probes); counted in neither of the above."""

    def add(self, block: int, decision: Decision) -> None:
        entry = self.blocks.setdefault(block, BlockStats())
        name = {Decision.COMPUTE: "computed", Decision.REUSE: "reused", Decision.PREDICT: "predicted"}[decision]
        setattr(entry, name, getattr(entry, name) + 1)
        while len(self.blocks) > RECENT_BLOCKS:
            oldest = self.blocks.pop(min(self.blocks))
            self.earlier = _sum([self.earlier, oldest])

    def totals(self) -> BlockStats:
        return _sum([self.earlier, *self.blocks.values()])

    @property
    def hit_rate(self) -> float:
        """Share of block-steps not computed."""
        t = self.totals()
        done = t.computed + t.reused + t.predicted
        return (t.reused + t.predicted) / done if done else 0.0

    def counts(self) -> dict[str, int]:
        """Decisions and FLOPs so far, as the runtime reports them (RunStats.skip derives the shares)."""
        t = self.totals()
        return {"computed": t.computed, "reused": t.reused, "predicted": t.predicted,
                "flops_computed": self.flops_computed, "flops_saved": self.flops_saved,
                "probe_flops": self.probe_flops}  # fmt: skip


def _sum(entries: list[BlockStats]) -> BlockStats:
    out = BlockStats()
    for entry in entries:
        out.computed += entry.computed
        out.reused += entry.reused
        out.predicted += entry.predicted
    return out


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean|now - before| / mean|before| (one host read: decisions are made on the host)."""
    return ((now.float() - before.float()).abs().mean() / (before.float().abs().mean() + 1e-8)).item()


class CachePolicy:
    """Base: keeps each block's last two computed outputs; subclasses decide.

    `threshold` 0 (and anything below it) never reuses: every policy must then give exactly the
    uncached output. `warmup` steps at the start of each block and the block's last step are
    always computed.
    """

    name = "none"
    needs_probe = False
    """True when `decide` reads the first-layer probe (fbcache): the executor then runs it."""
    needs_features = False
    """True when the policy reads per-layer features of computed forwards (bwcache)."""

    def __init__(self, threshold: float = 0.0, warmup: int = 1):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        if warmup < 1:
            raise ValueError("warmup must be >= 1: a block's first step has nothing to reuse")
        self.threshold, self.warmup = threshold, warmup
        self.history: dict[int, list[tuple[float, torch.Tensor]]] = {}
        """block -> [(sigma, flow)] of its last two computed steps, newest last."""
        self.state: dict[tuple[int, int], dict] = {}
        """(block, branch) -> the policy's indicator state."""

    # -- deciding --------------------------------------------------------------------------------

    def decide(self, infos: list[StepInfo], branches: int, signals) -> dict[tuple[int, int], Decision]:
        """Decisions for every (block, branch) of a tick. `signals` computes indicators lazily."""
        return {(i.block, br): self._decide(i, br, signals) for i in infos for br in range(branches)}

    def _decide(self, info: StepInfo, branch: int, signals) -> Decision:
        return Decision.COMPUTE

    def protected(self, info: StepInfo) -> bool:
        """Steps that always compute: the first `warmup` of each block and its last."""
        return info.step < self.warmup or info.last or info.block not in self.history

    def _slot(self, block: int, branch: int) -> dict:
        return self.state.setdefault((block, branch), {})

    # -- outputs ---------------------------------------------------------------------------------

    def computed(self, info: StepInfo, flow: torch.Tensor, features=None) -> None:
        """Remember a freshly computed flow `[B, C, F, H, W]` at the block's input level."""
        entries = self.history.setdefault(info.block, [])
        entries.append((info.sigma, flow))
        del entries[:-2]

    def output(self, info: StepInfo, decision: Decision) -> torch.Tensor:
        entries = self.history[info.block]
        if decision == Decision.REUSE or len(entries) < 2:
            return entries[-1][1]
        (s_b, f_b), (s_a, f_a) = entries
        # first-order Taylor in the noise level: F(s) = F(a) + (s - a) (F(a) - F(b)) / (a - b)
        return f_a + (info.sigma - s_a) / (s_a - s_b) * (f_a - f_b)

    def can_predict(self, info: StepInfo) -> bool:
        entries = self.history.get(info.block, [])
        return len(entries) == 2 and entries[0][0] != entries[1][0]

    def release(self, block: int) -> None:
        self.history.pop(block, None)
        for key in [k for k in self.state if k[0] == block]:
            del self.state[key]
