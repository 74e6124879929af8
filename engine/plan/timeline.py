"""Plans: which (block, step) pairs run at each tick. Scheduling is data, not loops.

A block takes its S denoising steps (step 0 .. S-1) at consecutive ticks, then one commit pass
(step S, at the commit noise level) that writes its clean K/V. Plans differ only in when each
block starts:

* `sequential`: one block at a time, block b starts at tick b * (S + 1) (Self-Forcing, CausVid,
  LongLive);
* `pyramid(offset)`: block b starts at tick b * offset, so up to ceil((S + 1) / offset) blocks are
  in flight (SkyReels-V2's asynchronous diffusion forcing with ar_step = offset, MAGI-1's chunk
  window, Block Cascading); offset >= S + 1 is sequential, offset 0 is synchronous;
* `skyreels_matrix`: SkyReels-V2's `generate_timestep_matrix`, reproduced exactly, and
  `skyreels_plan` which turns its rows into ticks.

Each tick also names `window`, the blocks [start, end) that a whole-window (reference) executor
recomputes at that tick; a selective executor computes only the blocks with work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.config import ConfigError
from engine.plan.sigmas import Schedule


@dataclass(frozen=True)
class Work:
    """One block's share of a tick: denoise step `step` (sigma_in -> sigma_out), or commit."""

    block: int
    step: int
    sigma_in: float
    sigma_out: float
    t_in: float
    """Time the network is told (0-1000 units)."""
    commit: bool
    """True for the pass (step == S) that writes the block's clean K/V."""
    steps: int
    """S, the block's number of denoising steps (a session may run blocks with fewer, see
    `Adjustable`)."""

    @property
    def last(self) -> bool:
        """The block's last denoising step: its output is the clean block."""
        return not self.commit and self.step == self.steps - 1


@dataclass(frozen=True)
class Tick:
    index: int
    work: tuple[Work, ...]
    """Sorted by block; the blocks are consecutive."""
    window: tuple[int, int]
    """Blocks [start, end) a whole-window executor computes at this tick."""

    @property
    def blocks(self) -> list[int]:
        return [w.block for w in self.work]


def make_work(schedule: Schedule, block: int, step: int) -> Work:
    if step == schedule.steps:
        return Work(block, step, 0.0, 0.0, schedule.commit_t, commit=True, steps=schedule.steps)
    sigma_in, sigma_out = schedule.sigmas[step], schedule.sigmas[step + 1]
    return Work(block, step, sigma_in, sigma_out, schedule.model_t[step], commit=False, steps=schedule.steps)


def pyramid(
    schedule: Schedule,
    *,
    offset: int,
    num_blocks: int | None = None,
    window_blocks: int | None = None,
    pre_ready: int = 0,
) -> Iterator[Tick]:
    """Block b (after `pre_ready` clean prefix blocks) takes step s at tick (b - pre_ready) * offset + s.

    Prefix blocks only commit, at tick 0. `num_blocks=None` runs forever (offset must be > 0).
    `window_blocks` bounds the whole-window view to the most recent blocks (None: from block 0).
    """
    if offset < 0 or (num_blocks is None and offset == 0):
        raise ValueError("offset must be >= 0, and > 0 for an endless plan")
    if num_blocks is not None and not 0 <= pre_ready <= num_blocks:
        raise ValueError(f"pre_ready ({pre_ready}) must lie in [0, num_blocks]")
    commit = schedule.steps

    def step_at(block: int, tick: int) -> int:
        """< 0: not started; 0 .. S-1: denoising; S: commit; > S: done."""
        if block < pre_ready:
            return commit + tick  # prefix blocks only commit, at tick 0
        return tick - (block - pre_ready) * offset

    first_open, tick = 0, 0
    while num_blocks is None or first_open < num_blocks:
        work, block = [], first_open
        while (num_blocks is None or block < num_blocks) and (step := step_at(block, tick)) >= 0:
            if step <= commit:
                work.append(make_work(schedule, block, step))
            block += 1
        if work:
            end = work[-1].block + 1
            begin = 0 if window_blocks is None else max(0, end - window_blocks)
            yield Tick(tick, tuple(work), (begin, end))
        while (num_blocks is None or first_open < num_blocks) and step_at(first_open, tick) >= commit:
            first_open += 1
        tick += 1


def sequential(
    schedule: Schedule, *, num_blocks: int | None = None, window_blocks: int | None = None, pre_ready: int = 0
) -> Iterator[Tick]:
    """Self-Forcing's loop: each block runs all its steps and its commit before the next starts
    (clean prefix blocks commit at tick 0, beside the first new block's first step)."""
    steps = schedule.steps + 1
    return pyramid(schedule, offset=steps, num_blocks=num_blocks, window_blocks=window_blocks, pre_ready=pre_ready)


def blocks_per_tick(schedule: Schedule, offset: int | None, num_blocks: int | None, prefix_blocks: int = 0) -> int:
    """Most blocks one forward can hold under a plan: sizes the KV cache's scratch."""
    if offset is None:  # sequential: the prefix's commits beside the first block's first step
        return prefix_blocks + 1 if prefix_blocks else 1
    if offset == 0:
        if num_blocks is None:
            raise ConfigError("a synchronous plan (offset 0) needs a finite number of blocks")
        return num_blocks
    return max(schedule.steps // offset + 1, prefix_blocks + 1)


def committed_blocks_needed(history_reach: tuple[int, ...], commit_reach: int, steps: int, offset: int | None) -> int:
    """Committed blocks the KV cache must keep so that every block can see its whole reach.

    Block b at step s attends to blocks b - reach + 1 .. b. Under a pyramid with `offset` the
    predecessors still in flight (steps s + j * offset <= S, the commit pass included) sit in the
    forward's scratch; the others must be committed. Sequential plans (offset None) have none in
    flight, so a 5-chunk reach needs 4 committed chunks (MAGI-1 at its widest stage)."""
    per_stage = steps // len(history_reach)
    needed = commit_reach - 1
    for step in range(steps):
        in_flight = 0 if offset is None else (steps - step) // offset
        needed = max(needed, history_reach[step // per_stage] - 1 - in_flight)
    return needed


# -- SkyReels-V2 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkyReelsMatrix:
    """The four results of SkyReels-V2's generate_timestep_matrix, per latent frame."""

    step_matrix: torch.Tensor  # [rows, frames] int64: time fed to each frame (999 = not started, 0 = done)
    step_index: torch.Tensor  # [rows, frames] int64: 0 = not started, k = k-th step taken, S + 1 = done
    update_mask: torch.Tensor  # [rows, frames] bool: frames whose solver steps at this row
    valid_interval: list[tuple[int, int]]  # per row, frames [start, end) the model sees


def _matrix_rows(num_blocks: int, steps: int, ar_step: int, pre_ready_blocks: int) -> tuple[list, list]:
    """Rows of per-block step indices and update masks (0 = not started, steps + 1 = done)."""
    done = steps + 1
    previous = [done if b < pre_ready_blocks else 0 for b in range(num_blocks)]
    indices, masks = [], []
    while not all(p >= done - 1 for p in previous):
        row: list[int] = []
        for b in range(num_blocks):
            if b == 0 or previous[b - 1] >= done - 1:
                row.append(previous[b] + 1)  # the block before is done with its steps: advance
            else:
                row.append(row[b - 1] - ar_step)  # lag ar_step behind the block before
        row = [min(max(v, 0), done) for v in row]
        masks.append([r != p and r != done for r, p in zip(row, previous)])
        indices.append(row)
        previous = row
    return indices, masks


def _valid_intervals(masks: list[list[bool]], num_blocks: int, base_blocks: int, shrink: bool) -> list[tuple[int, int]]:
    terminal = base_blocks
    if shrink:
        terminal = max(b for b, m in enumerate(masks[0]) if m) + 1
    intervals = []
    for mask in masks:
        if terminal < num_blocks and mask[terminal]:
            terminal += 1  # the window slides once the block past its edge starts
        intervals.append((max(terminal - base_blocks, 0), terminal))
    return intervals


def skyreels_matrix(
    num_frames: int,
    step_template: list[int] | torch.Tensor,
    base_num_frames: int,
    ar_step: int = 5,
    num_pre_ready: int = 0,
    causal_block_size: int = 1,
    shrink_interval_with_mask: bool = False,
) -> SkyReelsMatrix:
    """SkyReels-V2's asynchronous diffusion-forcing schedule (`generate_timestep_matrix`), exactly.

    Frames are grouped into blocks of `causal_block_size`; block i lags block i-1 by `ar_step` rows
    until it has taken all its steps. Rows index into [999] + step_template + [0].
    """
    template = [int(t) for t in (step_template.tolist() if isinstance(step_template, torch.Tensor) else step_template)]
    steps = len(template)
    num_blocks, base_blocks = num_frames // causal_block_size, base_num_frames // causal_block_size
    if base_blocks < num_blocks and ar_step < steps / base_blocks:
        raise ValueError(f"`ar_step` should be at least {math.ceil(steps / base_blocks)} in your setting")
    indices, masks = _matrix_rows(num_blocks, steps, ar_step, num_pre_ready // causal_block_size)
    intervals = _valid_intervals(masks, num_blocks, base_blocks, shrink_interval_with_mask)
    lookup = torch.tensor([999] + template + [0], dtype=torch.int64)
    index = torch.tensor(indices, dtype=torch.int64).repeat_interleave(causal_block_size, dim=1)
    mask = torch.tensor(masks, dtype=torch.bool).repeat_interleave(causal_block_size, dim=1)
    frame_intervals = [(s * causal_block_size, e * causal_block_size) for s, e in intervals]
    return SkyReelsMatrix(lookup[index], index, mask, frame_intervals)


def skyreels_plan(schedule: Schedule, matrix: SkyReelsMatrix, block_frames: int) -> list[Tick]:
    """The matrix's rows as ticks: each updated block takes its next step, and a block commits
    at the row after its last step (clean prefix blocks at the first row)."""
    index = matrix.step_index[:, ::block_frames]  # per block
    mask = matrix.update_mask[:, ::block_frames]
    steps, ticks = schedule.steps, []
    finished = {b for b in range(index.shape[1]) if index[0, b] == steps + 1}  # clean prefix
    for row in range(index.shape[0] + 1):
        work = [make_work(schedule, b, steps) for b in sorted(finished)]
        finished = set()
        if row < index.shape[0]:
            for b in mask[row].nonzero().flatten().tolist():
                step = int(index[row, b]) - 1
                work.append(make_work(schedule, b, step))
                if step == steps - 1:
                    finished.add(b)
        start, end = matrix.valid_interval[min(row, index.shape[0] - 1)]
        if work:
            work.sort(key=lambda w: w.block)
            ticks.append(Tick(row, tuple(work), (start // block_frames, end // block_frames)))
    return ticks
