"""Fewer denoising steps for few-step models, changed between blocks of a running stream.

A few-step model (Self-Forcing, CausVid: explicit trained timesteps, every step predicts the clean
block) can run with a subset of its trained timesteps: `fewer_steps(sampling, n)` keeps the first
(pure noise) and the last (the finest) and drops the ones just before the last, so 4 trained
steps (1000, 750, 500, 250) run as 3 (1000, 750, 250) or 2 (1000, 250): on the demo that keeps
more fidelity than (1000, 500, 250) (launch/benchmarks/steps.py measures both). Fewer steps cost fidelity
(launch/benchmarks/steps.py measures how much) and buy speed: a block takes S forwards and a commit.

`Adjustable` is an endless sequential or pyramid plan whose step count can change while it runs:
`set_schedule` applies to every block that has not started; blocks in flight finish under their
own. Each `Work` carries its block's step count, so the executor, the solver and the skip part
know a block's last step without asking the plan. Commits stay in block order: a block starts no
earlier than its plan allows (after the previous commit in a sequential plan, `offset` ticks after
the previous start in a pyramid) and late enough that its commit follows its predecessor's. With
one schedule throughout it yields exactly `sequential` / `pyramid` (tests/plan/test_steps.py).

Video in (video-to-video) uses the same plan: `from_strength(schedule, S)` is the schedule of a
block that starts from an input block noised to sigma S (the plan's steps below S run, the first
of them from S), and `Adjustable(..., choose=)` asks, as each block may start, which schedule it
takes: the strength schedule while input frames last, the plan's own after (engine/runtime/video_in.py).
`num_blocks` makes the plan finite: no block starts past it, and it ends once the last commits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engine.config import ConfigError, SamplingConfig
from engine.plan.sigmas import TRAIN_TIMESTEPS, Schedule, build_schedule
from engine.plan.timeline import Tick, make_work


def step_choices(sampling: SamplingConfig) -> tuple[int, ...]:
    """Step counts a session of this sampling setup can run, most first (only the configured one
    unless the model is a few-step one with explicit timesteps and a per-step x0 solver)."""
    trained = sampling.steps
    if sampling.timesteps is None or sampling.solver not in ("self-forcing", "euler"):
        return (trained,)
    return tuple(range(trained, 0, -1))


def subset(timesteps: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """`steps` of the trained `timesteps`: the first `steps - 1` (the coarse ones, which lay out
    the block) and the last (the finest, which every block ends on)."""
    return timesteps[: steps - 1] + timesteps[-1:] if steps > 1 else timesteps[:1]


def fewer_steps(sampling: SamplingConfig, steps: int) -> Schedule:
    """The schedule of `steps` of the trained timesteps (`subset`)."""
    if steps not in step_choices(sampling):
        raise ConfigError(f"{steps} steps: this sampling setup runs {list(step_choices(sampling))}")
    return build_schedule(dataclasses.replace(sampling, timesteps=subset(sampling.timesteps, steps)))


def from_strength(schedule: Schedule, strength: float) -> Schedule:
    """The steps of a block that starts from clean latents noised to sigma `strength` in (0, 1]:
    a first step from `strength` (the network told 1000 * strength), then the schedule's own steps
    below it. At or above the schedule's first sigma it is `schedule` itself (text-to-video)."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must lie in (0, 1], got {strength}")
    if strength >= schedule.sigmas[0]:
        return schedule
    below = [i for i in range(schedule.steps) if schedule.sigmas[i] < strength]
    sigmas = (strength, *(schedule.sigmas[i] for i in below), 0.0)
    model_t = (TRAIN_TIMESTEPS * strength, *(schedule.model_t[i] for i in below))
    return dataclasses.replace(schedule, sigmas=sigmas, model_t=model_t)


class Adjustable:
    """An endless plan (offset None: sequential) whose blocks may take different step counts."""

    def __init__(
        self,
        schedule: Schedule,
        offset: int | None,
        window_blocks: int | None = None,
        pre_ready: int = 0,
        *,
        num_blocks: int | None = None,
        choose: Callable[[int], Schedule | None] | None = None,
    ):
        """`choose(b)`: block b's schedule, asked (maybe more than once) while b waits to start;
        None (or its answer None): `schedule`, as `set_schedule` last set it. `num_blocks`
        counts the `pre_ready` ones."""
        if offset is not None and offset <= 0:
            raise ValueError("an endless pyramid needs offset > 0")
        self.schedule, self.offset, self.window_blocks = schedule, offset, window_blocks
        self.num_blocks, self.choose = num_blocks, choose
        self.flight: list[tuple[int, int, Schedule]] = [(b, -schedule.steps, schedule) for b in range(pre_ready)]
        """(block, start tick, schedule) of the blocks started and not yet committed, in order
        (`pre_ready` clean start blocks: as if started S ticks ago, so they commit at tick 0)."""
        self.next_block, self.tick = pre_ready, 0
        self.earliest = 0
        """The plan's own earliest start of the next block (before the commit-order rule)."""
        self.last_commit = -1

    def set_schedule(self, schedule: Schedule) -> None:
        """Blocks that start from now on take `schedule`'s steps."""
        self.schedule = schedule

    def __iter__(self) -> Adjustable:
        return self

    def __next__(self) -> Tick:
        tick = self.tick
        if self.num_blocks is None or self.next_block < self.num_blocks:
            if tick >= self.earliest and tick + self._upcoming().steps > self.last_commit:
                self._start(tick)
        if not self.flight:
            raise StopIteration  # only a finite plan runs out
        work = [make_work(schedule, block, tick - start) for block, start, schedule in self.flight]
        while self.flight and tick - self.flight[0][1] == self.flight[0][2].steps:
            self.flight.pop(0)  # committing this tick (a given start's blocks all at tick 0)
        end = work[-1].block + 1
        begin = 0 if self.window_blocks is None else max(0, end - self.window_blocks)
        self.tick += 1
        return Tick(tick, tuple(work), (begin, end))

    def _upcoming(self) -> Schedule:
        chosen = None if self.choose is None else self.choose(self.next_block)
        return self.schedule if chosen is None else chosen

    def _start(self, tick: int) -> None:
        schedule = self._upcoming()
        steps = schedule.steps
        self.flight.append((self.next_block, tick, schedule))
        self.next_block += 1
        self.last_commit = tick + steps
        self.earliest = tick + steps + 1 if self.offset is None else tick + self.offset
