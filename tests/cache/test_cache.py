"""Feature caching per stream block: exactness at threshold 0, the skipped-block attention layout,
and each policy's decision rule.

    pytest tests/cache/test_cache.py
"""

import dataclasses

import pytest
import torch

from cache import POLICIES, Decision, StepInfo, make_policy
from cache.base import CacheStats
from cache.bwcache import BWCache
from cache.flowcache import FlowCache
from cache.scope import Scope
from engine.config import CacheConfig, ConfigError, PlanConfig
from engine.loading import build_kv_cache
from engine.models.wan import WanModel
from engine.runtime.outputs import RunStats
from engine.runtime.views import InFlightView
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.presets import get_preset

ACTIVE = [p for p in POLICIES if p != "none"]


def _preset(name: str, schedule: str, attention: str, policy: str, threshold: float, offset: int = 1, context="joint"):
    preset = get_preset(name)
    offset = None if schedule == "sequential" else offset
    plan = PlanConfig(schedule=schedule, offset=offset, attention=attention, context=context)
    return dataclasses.replace(preset, plan=plan, cache=CacheConfig(policy=policy, threshold=threshold))


def _generate(preset, blocks: int = 5) -> tuple[torch.Tensor, RunStats]:
    pipeline = build_session(preset, WeightPaths(seed=2), torch.device("cpu"), torch.float32)

    def prompt(tick):  # a switch mid-way: the policies must not care
        return "a red circle moving left" if tick.index < 5 else "a blue square moving up"

    with torch.no_grad():
        run = pipeline.run(prompt, blocks=blocks, seed=1)
        latents = torch.cat([b.latents for b in run], dim=2)
    return latents, run.stats


@pytest.mark.parametrize(
    "name, schedule, attention, context",
    [
        ("tiny-wan", "sequential", "causal", "joint"),
        ("tiny-wan", "pyramid", "causal", "joint"),
        ("tiny-wan", "pyramid", "bidirectional", "joint"),
        ("skyreels-v2-df-tiny", "pyramid", "bidirectional", "joint"),  # guided: two branches per forward
        ("tiny-wan", "pyramid", "causal", "lagged"),  # lagged context: one forward per block
    ],
)
def test_threshold_zero_is_exactly_uncached(name, schedule, attention, context):
    reference, _ = _generate(_preset(name, schedule, attention, "none", 0.0, context=context))
    for policy in ACTIVE:
        cached, stats = _generate(_preset(name, schedule, attention, policy, 0.0, context=context))
        assert torch.equal(cached, reference), f"{policy}: max diff {(cached - reference).abs().max():.3g}"
        assert stats.hit_rate == 0 and stats.skip["computed"] > 0, (policy, stats.skip_summary())


@pytest.mark.parametrize("policy", ACTIVE)
def test_policies_skip_work_and_stay_close(policy):
    """Generous thresholds: every policy skips some block-steps, counts them, and the video stays
    near the uncached one (a tiny random model; the benchmark measures fidelity on the demo)."""
    preset = _preset("skyreels-v2-df-tiny", "pyramid", "causal", "none", 0.0)
    preset = dataclasses.replace(preset, sampling=dataclasses.replace(preset.sampling, num_steps=12))
    reference, _ = _generate(preset)
    thresholds = {"teacache": 2.0, "fbcache": 0.5, "bwcache": 0.5, "flowcache": 0.5, "flowcache-skyreels": 2.0}
    cached_preset = dataclasses.replace(preset, cache=CacheConfig(policy=policy, threshold=thresholds.get(policy, 0.5)))
    cached, stats = _generate(cached_preset)
    counts = stats.skip
    assert counts["computed"] + counts["reused"] + counts["predicted"] == 5 * 12, stats.skip_summary()
    assert stats.hit_rate > 0.1, stats.skip_summary()
    assert 0 < stats.flops_saved_share < 1
    assert stats.frames == (counts["computed"] + 5) * 2  # skipped blocks left the forward (+ 5 commits)
    assert torch.isfinite(cached).all()
    assert (cached - reference).abs().mean() < 0.5 * reference.abs().mean(), stats.skip_summary()


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_skipped_blocks_are_attended_through_their_last_kv(attention):
    """A forward without block 0, which is represented by K/V recorded when it ran, gives block 1
    the output it had in the forward over both blocks, to float32 rounding: the two forwards run
    block 1's tokens in batches of different sizes, and CPU kernels may sum them in another order."""
    preset = get_preset("tiny-wan")
    torch.manual_seed(0)
    model = WanModel(preset.model).eval()
    cache = build_kv_cache(preset, torch.float32, torch.device("cpu"), batch=1, scratch_frames=6)
    x, sigma = torch.randn(preset.latent_shape(6)), torch.rand(1, 6, dtype=torch.float64)
    text = model.embed_text(torch.randn(1, 8, preset.model.text_dim))
    with torch.no_grad():
        both = InFlightView(cache, [0, 1], [0, 1], 3, attention, record=True)
        full = model(x, sigma, text, both)
        stored = both.recorded()[0]
        fill = lambda layer, fresh: {0: stored.layer(layer)}  # noqa: E731
        alone = model(x[:, :, 3:], sigma[:, 3:], text, InFlightView(cache, [0, 1], [1], 3, attention, fill=fill))
    assert_close(alone, full[:, :, 3:], 1e-5, "block 1 with block 0 skipped")


def _info(step: int, steps: int = 10, block: int = 0) -> StepInfo:
    return StepInfo(block, step, steps, 1 - step / steps, 1 - (step + 1) / steps)


class _Signals:
    """Stand-in indicators: the embedded input moves by `moves[step]` relative L1 each step."""

    def __init__(self):
        self.value = torch.ones(1, 4, 2)  # [B, tokens, dim]

    def step(self, change: float):
        self.value = self.value * (1 + change)

    def embedded(self, block):
        return self.value

    modulated = embedded


def test_flowcache_accumulates_then_resets():
    policy, signals = FlowCache(threshold=0.05, warmup=2), _Signals()
    decisions = []
    for step in range(10):
        signals.step(0.02)
        info = _info(step)
        decision = policy.decide([info], 1, signals)[(0, 0)]
        if decision == Decision.COMPUTE:
            policy.computed(info, torch.full((1,), float(step)))
        decisions.append(decision)
    # warmup 2 compute; then 0.02 + 0.02 < 0.05 reuse twice, the third change crosses and computes
    C, R = Decision.COMPUTE, Decision.REUSE
    assert decisions == [C, C, R, R, C, R, R, C, R, C], decisions


def test_scope_predicts_linear_outputs_exactly_and_caps_skips():
    policy, signals = Scope(threshold=0.01, warmup=2, predict_factor=100, max_predictions=2), _Signals()
    decisions = []
    for step in range(9):
        signals.step(0.02)
        info = _info(step, steps=9)
        decision = policy.decide([info], 1, signals)[(0, 0)]
        truth = torch.tensor([3.0 * info.sigma + 1.0])  # an output linear in the noise level
        if decision == Decision.COMPUTE:
            policy.computed(info, truth)
        else:
            assert decision == Decision.PREDICT
            assert torch.allclose(policy.output(info, decision), truth, atol=1e-6)
        decisions.append(decision)
    C, P = Decision.COMPUTE, Decision.PREDICT
    assert decisions == [C, C, P, P, C, P, P, C, C], decisions  # two in a row at most; last step computes


def test_bwcache_reuses_for_its_period_and_protects_the_tail():
    policy = BWCache(threshold=0.1, warmup=1, reuse_period=2, steps=10)
    features = [torch.ones(3)]
    decisions = []
    for step in range(10):
        info = _info(step)
        decision = policy.decide([info], 1, None)[(0, 0)]
        if decision == Decision.COMPUTE:
            policy.computed(info, torch.zeros(1), features)
        decisions.append(decision)
    # settles at step 1 (same features as step 0): reuse 2, compute, reuse 2... until the tail
    # (first trigger at step 1: steps >= 1 + ceil(9 / 2) = 6 compute)
    C, R = Decision.COMPUTE, Decision.REUSE
    assert decisions == [C, C, R, R, C, R, C, C, C, C], decisions


def test_teacache_decides_for_every_block_at_once():
    policy = make_policy("teacache", threshold=0.05, steps=10, dim=32, warmup=1)
    signals = _Signals()
    infos = [_info(3, block=0), _info(1, block=1)]
    for info in infos:
        policy.computed(info, torch.zeros(1))
    policy.decide(infos, 1, signals)  # first sight: computes, remembers the signal
    signals.step(0.01)
    later = [_info(4, block=0), _info(2, block=1)]
    decisions = policy.decide(later, 1, signals)
    assert decisions[(0, 0)] == decisions[(1, 0)] == Decision.REUSE


def test_cache_configuration_errors():
    with pytest.raises(ConfigError, match="cache policy"):
        CacheConfig(policy="magic")
    with pytest.raises(ConfigError, match="selective"):
        dataclasses.replace(
            get_preset("tiny-wan"), plan=PlanConfig(compute="window"), cache=CacheConfig(policy="flowcache")
        )
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("magic", threshold=0.1, steps=4, dim=32)
    stats = CacheStats()
    stats.add(0, Decision.REUSE)
    stats.add(0, Decision.COMPUTE)
    assert stats.hit_rate == 0.5
