"""Fewer denoising steps for few-step models: the subsets, the adjustable plan, and a stream whose
step count changes between blocks.

pytest tests/plan/test_steps.py
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from engine.config import ConfigError, SamplingConfig
from engine.plan.sigmas import build_schedule
from engine.plan.steps import Adjustable, fewer_steps, step_choices
from engine.plan.timeline import pyramid, sequential
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.presets import get_preset

RED = "a red circle moving left"


def test_subsets_keep_the_first_and_last_trained_timesteps():
    sampling = SamplingConfig()  # Self-Forcing's 1000, 750, 500, 250
    assert step_choices(sampling) == (4, 3, 2, 1)
    assert step_choices(dataclasses.replace(sampling, timesteps=None, num_steps=8, solver="unipc")) == (8,)
    picked = {n: fewer_steps(sampling, n) for n in (4, 3, 2)}
    assert picked[4] == build_schedule(sampling)
    assert picked[3] == build_schedule(dataclasses.replace(sampling, timesteps=(1000.0, 750.0, 250.0)))
    assert picked[2] == build_schedule(dataclasses.replace(sampling, timesteps=(1000.0, 250.0)))
    with pytest.raises(ConfigError, match="runs"):
        fewer_steps(sampling, 5)


@pytest.mark.parametrize("offset", [None, 1, 2, 3])
@pytest.mark.parametrize("pre_ready", [0, 2])
def test_one_schedule_throughout_is_the_plain_plan(offset, pre_ready):
    """... with or without a given start (its blocks only commit, at tick 0)."""
    schedule = build_schedule(SamplingConfig())
    if offset is None:
        plain = sequential(schedule, window_blocks=3, pre_ready=pre_ready)
    else:
        plain = pyramid(schedule, offset=offset, window_blocks=3, pre_ready=pre_ready)
    got = list(itertools.islice(Adjustable(schedule, offset, 3, pre_ready=pre_ready), 40))
    assert got == list(itertools.islice(plain, 40))


@pytest.mark.parametrize("offset", [None, 1, 2])
def test_steps_change_between_blocks_and_commits_stay_in_order(offset):
    sampling = SamplingConfig()
    plan = Adjustable(fewer_steps(sampling, 4), offset, 3)
    ticks, steps_by_block = [], {}
    for i in range(60):
        if i in (7, 23, 41):  # down, down, back up
            plan.set_schedule(fewer_steps(sampling, {7: 3, 23: 2, 41: 4}[i]))
        tick = next(plan)
        assert tick.index == i and tick.work, "ticks are consecutive and never empty"
        blocks = tick.blocks
        assert blocks == list(range(blocks[0], blocks[0] + len(blocks))), f"tick {i}: blocks {blocks}"
        commits = [w.commit for w in tick.work]
        assert commits == sorted(commits, reverse=True) and sum(commits) <= 1, f"tick {i}: commit after work"
        for w in tick.work:
            assert steps_by_block.setdefault(w.block, w.steps) == w.steps, "a block keeps its step count"
        ticks.append(tick)
    assert {2, 3, 4} <= set(steps_by_block.values())
    for block, steps in steps_by_block.items():
        taken = [w.step for t in ticks for w in t.work if w.block == block]
        assert taken == list(range(len(taken))) and len(taken) <= steps + 1, f"block {block}: steps {taken}"
    commit_ticks = [t.index for t in ticks for w in t.work if w.commit]
    assert commit_ticks == sorted(commit_ticks)


@pytest.fixture(scope="module")
def session():
    torch.set_grad_enabled(False)
    return build_session(get_preset("demo"), WeightPaths(), torch.device("cpu"), torch.float32)


def stream(session, plan, blocks: int, seed: int = 3, switch=None) -> list[torch.Tensor]:
    executor = session.executors(NoiseSource(seed), blocks_in_forward=1)
    text, out = session.prompts.conditioning(RED), []
    for tick in plan:
        if switch is not None:
            switch(tick, plan)
        out.extend(b.latents for b in executor.step(tick, text))
        if len(out) == blocks:
            return out
    raise AssertionError("the plan ended")


def test_a_stream_at_two_steps_equals_a_model_configured_with_those_steps(session):
    two = dataclasses.replace(session.preset.sampling, timesteps=(1000.0, 250.0))
    configured = session.reconfigured(dataclasses.replace(session.preset, sampling=two))
    expected = stream(configured, configured.plan(None), 4)
    got = stream(session, Adjustable(fewer_steps(session.preset.sampling, 2), None, 3), 4)
    for block, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, 0.0, f"block {block}")


def test_lowering_steps_mid_stream_keeps_the_blocks_before_and_runs_on(session):
    full = stream(session, Adjustable(session.schedule, None, 3), 6)

    def lower(tick, plan):
        if tick.index == 9:  # block 1's commit tick (sequential: 5 ticks a block): blocks 2+ take 2 steps
            plan.set_schedule(fewer_steps(session.preset.sampling, 2))

    lowered = stream(session, Adjustable(session.schedule, None, 3), 6, switch=lower)
    for block in range(2):
        assert_close(lowered[block], full[block], 0.0, f"block {block} before the change")
    assert all(torch.isfinite(b).all() for b in lowered)
    assert not torch.equal(lowered[3], full[3]), "blocks after the change ran with fewer steps"
