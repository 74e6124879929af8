"""Feature caching per stream block: policies that skip a block's forward when its output can be
reused or predicted (one file per policy), and the executor that applies them from outside the
model.

May import: engine/ (never parallel/ or launch/). Main entry points: `make_policy` below, one
policy per file (teacache, fbcache, bwcache, flowcache, scope), `skip.CacheSkip` (the executor's
skip part) and `signals` (what a policy reads of a block).

    policy = make_policy("flowcache", threshold=0.05, steps=30, dim=model.cfg.dim)
"""

from __future__ import annotations

from cache.base import CachePolicy, CacheStats, Decision, StepInfo
from cache.bwcache import BWCache
from cache.fbcache import FBCache
from cache.flowcache import FlowCache
from cache.scope import Scope
from cache.teacache import TeaCache
from engine.config import CACHE_POLICIES as POLICIES

__all__ = ["POLICIES", "SUGGESTED_THRESHOLDS", "CachePolicy", "CacheStats", "Decision", "StepInfo", "make_policy"]

SUGGESTED_THRESHOLDS = {
    "none": 0.0,
    "teacache": 0.3,
    "fbcache": 0.1,
    "bwcache": 0.1,
    "flowcache": 0.1,
    "flowcache-skyreels": 0.1,
    "scope": 0.05,
}
"""What `--cache POLICY` uses without --cache-threshold: each policy's best setting of the README's
caching table (the demo model, 30 steps), a starting point to tune from."""


def make_policy(name: str, *, threshold: float, steps: int, dim: int, warmup: int | None = None) -> CachePolicy:
    """A fresh policy (state for one stream). `warmup`: steps each block always computes first
    (default: 15% of the steps, at least 1 — FlowCache uses 4-5 of 50)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    warmup = warmup if warmup is not None else max(1, round(0.15 * steps))
    if name == "none":
        return CachePolicy(0.0, warmup)
    if name == "teacache":
        return TeaCache(threshold, warmup, dim=dim)
    if name == "fbcache":
        return FBCache(threshold, warmup)
    if name == "bwcache":
        return BWCache(threshold, warmup, steps=steps)
    if name == "scope":
        return Scope(threshold, warmup, dim=dim)
    variant = "skyreels" if name == "flowcache-skyreels" else "magi"
    return FlowCache(threshold, warmup, variant=variant, dim=dim)
