"""Plans: properties of every generator, and SkyReels-V2's timestep matrix reproduced exactly.

pytest tests/plan/test_timeline.py
"""

import itertools

import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.config import SamplingConfig
from engine.plan.sigmas import build_schedule
from engine.plan.timeline import pyramid, sequential, skyreels_matrix, skyreels_plan

SETTINGS = settings(max_examples=60, deadline=None)


def _schedule(steps: int):
    return build_schedule(SamplingConfig(timesteps=None, num_steps=steps, shift=8.0, solver="unipc"))


def check_plan(ticks, num_blocks: int, steps: int, pre_ready: int = 0, offset: int | None = None) -> None:
    """Every block takes each step once, in order, on consecutive ticks, then commits once;
    prefix blocks only commit, at the first tick; commits come in block order; each tick's
    blocks are consecutive with committing blocks first. With `offset`, step s of block b
    happens exactly at tick (b - pre_ready) * offset + s: never before the plan allows it."""
    history = {b: [] for b in range(num_blocks)}
    commit_order = []
    for tick in ticks:
        blocks = tick.blocks
        assert blocks == list(range(blocks[0], blocks[0] + len(blocks))), f"tick {tick.index}: {blocks}"
        flags = [w.commit for w in tick.work]
        assert flags == sorted(flags, reverse=True), f"tick {tick.index}: commits must come first"
        assert tick.window[0] <= blocks[0] and blocks[-1] < tick.window[1] or any(flags)
        for work in tick.work:
            history[work.block].append((tick.index, work.step))
            if work.commit:
                commit_order.append(work.block)
                assert work.step == steps
    assert commit_order == list(range(num_blocks)), "one commit per block, in order"
    for block, events in history.items():
        if block < pre_ready:
            assert events == [(0, steps)], f"prefix block {block}: {events}"
            continue
        assert [s for _, s in events] == list(range(steps + 1)), f"block {block} steps {events}"
        ticks_of = [t for t, _ in events]
        assert ticks_of == list(range(ticks_of[0], ticks_of[0] + steps + 1)), f"block {block} ticks {ticks_of}"
        if offset is not None:
            assert ticks_of[0] == (block - pre_ready) * offset, f"block {block} starts at {ticks_of[0]}"


@SETTINGS
@given(blocks=st.integers(1, 7), steps=st.integers(1, 6), offset=st.integers(0, 8), data=st.data())
def test_pyramid_properties(blocks, steps, offset, data):
    pre_ready = data.draw(st.integers(0, blocks))
    ticks = list(pyramid(_schedule(steps), offset=offset, num_blocks=blocks, pre_ready=pre_ready))
    check_plan(ticks, blocks, steps, pre_ready, offset)
    if offset >= 1:
        most = max(sum(1 for w in t.work) for t in ticks)
        assert most <= max(steps // offset + 1, pre_ready + 1)  # what sizes the KV scratch


@SETTINGS
@given(blocks=st.integers(1, 6), steps=st.integers(1, 5))
def test_sequential_is_pyramid_with_offset_steps_plus_one(blocks, steps):
    schedule = _schedule(steps)
    seq = list(sequential(schedule, num_blocks=blocks))
    check_plan(seq, blocks, steps, offset=steps + 1)
    assert all(len(t.work) == 1 for t in seq)
    assert [t.work for t in seq] == [t.work for t in pyramid(schedule, offset=steps + 5, num_blocks=blocks)]


def test_endless_plans_stream_lazily():
    schedule = _schedule(4)
    ticks = list(itertools.islice(pyramid(schedule, offset=1), 200))
    assert ticks[-1].index == 199 and len(ticks[-1].work) == 5  # 4 denoising blocks + 1 committing
    with pytest.raises(ValueError, match="endless"):
        next(pyramid(schedule, offset=0))


def test_window_bounds_the_whole_window_view():
    ticks = list(pyramid(_schedule(3), offset=1, num_blocks=10, window_blocks=4))
    assert all(t.window[1] - t.window[0] <= 4 and t.window[1] == t.work[-1].block + 1 for t in ticks)


# -- SkyReels-V2 -------------------------------------------------------------------------------


def _diffusers_matrix(*args):
    return SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(None, *args)


MATRIX_CASES = [
    # (num_frames, steps, base_num_frames, ar_step, num_pre_ready, causal_block_size, shrink)
    (25, 30, 25, 5, 0, 5, False),  # the README's async setting
    (25, 30, 25, 0, 0, 1, False),  # synchronous
    (50, 30, 25, 6, 0, 5, False),  # window smaller than the sequence
    (50, 30, 25, 6, 10, 5, False),  # ... with a clean prefix
    (12, 4, 12, 1, 3, 3, False),
    (9, 7, 3, 3, 0, 1, False),
    (17, 5, 17, 2, 0, 1, False),  # frames not a multiple of the block count
]


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_matrix_equals_diffusers(case):
    frames, steps, base, ar_step, pre_ready, block, shrink = case
    template = torch.tensor([int(t) for t in _schedule(steps).model_t])
    expected = _diffusers_matrix(frames, template, base, ar_step, pre_ready, block, shrink)
    actual = skyreels_matrix(frames, template, base, ar_step, pre_ready, block, shrink)
    assert torch.equal(actual.step_matrix, expected[0])
    assert torch.equal(actual.step_index, expected[1])
    assert torch.equal(actual.update_mask, expected[2])
    assert actual.valid_interval == expected[3]


@SETTINGS
@given(
    blocks=st.integers(1, 6),
    steps=st.integers(1, 6),
    ar_step=st.integers(0, 4),
    block=st.integers(1, 3),
    data=st.data(),
)
def test_matrix_equals_diffusers_everywhere(blocks, steps, ar_step, block, data):
    base_blocks = data.draw(st.integers(1, blocks))
    assume(base_blocks == blocks or ar_step >= steps / base_blocks)
    pre_ready = data.draw(st.integers(0, blocks - 1)) * block
    template = torch.tensor([int(t) for t in _schedule(steps).model_t])
    args = (blocks * block, template, base_blocks * block, ar_step, pre_ready, block)
    expected, actual = _diffusers_matrix(*args), skyreels_matrix(*args)
    assert torch.equal(actual.step_index, expected[1]) and torch.equal(actual.update_mask, expected[2])
    assert actual.valid_interval == expected[3]


@SETTINGS
@given(blocks=st.integers(1, 6), steps=st.integers(1, 6), ar_step=st.integers(0, 4), data=st.data())
def test_matrix_plan_is_the_pyramid(blocks, steps, ar_step, data):
    """Over a whole segment, SkyReels' matrix is the pyramid plan with offset min(ar_step, steps):
    a block never waits once the block before it has taken all its steps."""
    pre_ready = data.draw(st.integers(0, blocks - 1))
    schedule = _schedule(steps)
    matrix = skyreels_matrix(blocks * 2, [int(t) for t in schedule.model_t], blocks * 2, ar_step, pre_ready * 2, 2)
    plan = skyreels_plan(schedule, matrix, 2)
    check_plan(plan, blocks, steps, pre_ready, min(ar_step, steps))
    expected = pyramid(schedule, offset=min(ar_step, steps), num_blocks=blocks, pre_ready=pre_ready)
    assert [t.work for t in plan] == [t.work for t in expected]


def test_shrunk_interval_starts_at_the_first_rows_updates():
    """diffusers' (and the original's) shrink path crashes: it rebinds update_mask to its first row.
    Ours does what it evidently means: the first interval ends after the last block updated in
    the first row, then slides as usual."""
    template = torch.tensor([int(t) for t in _schedule(10).model_t])
    with pytest.raises(IndexError):
        _diffusers_matrix(40, template, 20, 3, 4, 2, True)
    shrunk = skyreels_matrix(40, template, 20, 3, 4, 2, shrink_interval_with_mask=True)
    plain = skyreels_matrix(40, template, 20, 3, 4, 2)
    assert shrunk.valid_interval[0] == (0, 6)  # 2 prefix blocks + the first working block, in frames
    assert torch.equal(shrunk.step_index, plain.step_index)
    ends = [end for _, end in shrunk.valid_interval]
    assert ends == sorted(ends) and ends[-1] == 40
    assert all(end - start <= 20 for start, end in shrunk.valid_interval)


def test_ar_step_too_small_for_the_window():
    with pytest.raises(ValueError, match="at least 6"):
        skyreels_matrix(50, list(range(30, 0, -1)), 25, ar_step=5, causal_block_size=5)
