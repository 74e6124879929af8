"""Which sessions run in a round and at what fidelity (playout slack), and how many sessions fit.

Every session has a viewer whose playout clock runs at the stream's fps from its first frame; its
*slack* is the video generated but not yet played. A round steps at most `batch` sessions by one
tick, in one coalesced call where their shapes allow (engine/runtime/coalesce.py).

* **Order.** `slack`: the least slack first; sessions holding more than `target_slack_s` wait
  (their viewers have video enough), and a session below the target that has not been served for
  `max_wait_rounds` rounds goes first, so none starves: with n sessions below the target, each is
  served at least once every `max_wait_rounds + ceil(n / batch)` rounds. `fifo` (a baseline):
  the sessions below the target in the order they were last served, no slack priority.
* **Fidelity.** When capacity is short for a session (its share of the rounds yields video slower
  than it plays) and its predicted slack at its next block (slack now minus the ticks it still
  needs, at the measured round time and its share of the rounds) falls below `degrade_below_s`,
  its feature-cache threshold goes one rung up the ladder, never past the quality floor; a
  session that keeps up goes up only if its next block would still come late. Above
  `recover_above_s` it comes one rung down. Sessions that have not shown a frame yet have no
  clock to miss and keep full fidelity.
* **Rungs.** A rung lowers fidelity by a feature-cache threshold (blocks skip some of their
  steps) or, for few-step models, by running fewer denoising steps per block (4 -> 3 -> 2:
  engine/plan/steps.py); each rung carries its measured PSNR, and those below `floor_db` are
  not used. A rung's cost is the forwards a block takes: S' * (1 - skipped) + 1 (the commit).
* **Admission.** A new session needs its KV bytes under the memory budget and the measured
  throughput (`Throughput`: seconds per round at each batch size) to cover every running session
  at the stream's fps: n sessions fit when n * fps <= min(n, batch) * frames_per_tick / round_s,
  times the floor's speedup when admitting at the floor (the default where a ladder is measured).
  A viewer beyond that is offered the frame rate it would get (every session sharing the
  rounds at the floor) when it is at least `min_offer_fps`; it may take it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple


class Rung(NamedTuple):
    """One fidelity level of a ladder."""

    threshold: float
    """Feature-cache threshold (0: nothing skipped)."""
    psnr_db: float
    """PSNR of whole videos made at this rung against the same videos at full fidelity."""
    skipped: float
    """Share of the block-steps the cache skipped."""
    steps: int | None = None
    """Denoising steps per block (None: the plan's own)."""

    def forwards(self, steps: int) -> float:
        """Forwards per block on a plan of `steps` steps: its steps not skipped, and the commit."""
        taken = steps if self.steps is None else min(self.steps, steps)
        return taken * (1 - self.skipped) + 1


# The demo model's fidelity ladder, measured on the preset's own 4-step plan (8 prompts x 8 blocks).
# Cache thresholds:
#   python -m launch.bench cache --plans self-forcing --policies flowcache \
#       --thresholds 0 1.25 1.5 1.75 2 2.5 3 4 --prompts 8 --blocks 8
# 0 -> inf (identical), 1.25 -> inf (nothing skipped), 1.5 / 1.75 / 2 / 2.5 -> 27.0 dB (a quarter of
# the block-steps skipped: one of the two middle steps), 3 / 4 -> 23.9 dB (both middle steps).
# A degraded chunk alone loses less than a whole video degraded throughout (errors compound).
DEMO_LADDER: tuple[tuple[float, float, float], ...] = ((0.0, math.inf, 0.0), (2.0, 27.0, 0.25), (4.0, 23.9, 0.5))
# Fewer denoising steps (engine/plan/steps.py: the first S' - 1 trained timesteps and the last),
# whole videos against the same videos at 4 steps (24 prompts x 8 blocks):
#   python -m launch.bench steps --prompts 24 --blocks 8
# 3 steps (1000, 750, 250) -> 26.6 dB, 2 (1000, 250) -> 23.6 dB, 1 (1000) -> 21.4 dB. Adherence
# (color / shape / motion read back, all three): 4 steps 0.96 / 0.58 / 0.92, 0.50; 3 steps
# 0.96 / 0.71 / 1.00, 0.67; 2 steps 0.96 / 0.54 / 1.00, 0.50; 1 step 0.67 / 0.50 / 0.92, 0.29.
# A block takes S' + 1 forwards: 2 steps serve 5/3 as many sessions as 4. Unlike a cache threshold,
# whose skips depend on the content, fewer steps always save what they promise.
DEMO_STEPS: tuple[Rung, ...] = (Rung(0.0, math.inf, 0.0), Rung(0.0, 26.6, 0.0, steps=3), Rung(0.0, 23.6, 0.0, steps=2),
                                Rung(0.0, 21.4, 0.0, steps=1))  # fmt: skip
DEFAULT_FLOOR_DB = 23.0
"""The demo down to 2 steps: color and motion read back as at 4 steps, shape less often (above)."""
LADDERS = {"demo": DEMO_STEPS}
"""Measured ladders by preset. A preset without one runs at full fidelity only."""
EXACT: tuple[tuple[float, float, float], ...] = ((0.0, math.inf, 0.0),)
MIN_OFFER_FPS = 2.0
"""A viewer is offered a lower frame rate only down to this; below it, refused."""

ORDERS = ("slack", "fifo")


@dataclass(frozen=True)
class Limits:
    """What the session manager may do: memory, batch, slack targets, fidelity floor, timeouts."""

    kv_budget_bytes: int
    """Device memory for the running sessions' KV caches."""
    batch: int = 4
    """Sessions per round (one coalesced forward where shapes allow)."""
    target_slack_s: float = 2.0
    max_wait_rounds: int = 4
    order: str = "slack"
    degrade: bool = True
    degrade_below_s: float = 0.5
    recover_above_s: float = 1.0
    ladder: tuple[tuple, ...] | None = None
    """Rungs (cache threshold, PSNR dB, share of block-steps skipped[, steps]), exact first, in
    the order fidelity is lowered (None: the preset's measured one in LADDERS)."""
    floor_db: float = DEFAULT_FLOOR_DB
    """No rung below this PSNR is used."""
    throughput_admission: bool = True
    admit_at_floor: bool = True
    """Admit as many sessions as the throughput keeps at the floor's fidelity (more sessions, each
    degraded when capacity is short), not at full fidelity. Without a measured ladder the floor
    is full fidelity, so this changes nothing there."""
    min_offer_fps: float = MIN_OFFER_FPS
    """A viewer beyond capacity is offered the frame rate it would get down to this (0: never)."""
    headroom: float = 0.9
    """Share of the measured throughput that admission hands out."""
    queue: int = 8
    """Waiting places for connections beyond capacity."""
    retry_s: float = 2.0
    """Retry-after per place in the queue."""
    ticket_s: float = 3.0
    """A queued place not asked for again within this long after its retry-after is given up."""
    grace_s: float = 10.0
    """A session without viewers keeps its device state this long, then is suspended."""
    expire_s: float = 120.0
    """... and is freed this long after suspension."""

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"scheduler order must be one of {ORDERS}, got {self.order!r}")
        if self.batch < 1 or self.max_wait_rounds < 1 or self.queue < 0 or self.kv_budget_bytes <= 0:
            raise ValueError("batch and max_wait_rounds must be >= 1, queue >= 0 and the KV budget > 0")
        if self.ladder is not None and (not self.ladder or self.ladder[0][0] != 0.0):
            raise ValueError("the fidelity ladder starts with the exact rung (threshold 0)")

    @property
    def levels(self) -> tuple[Rung, ...]:
        """The rungs within the floor, exact first (only the exact one without degradation)."""
        usable = tuple(Rung(*rung) for rung in self.ladder or EXACT if rung[1] >= self.floor_db)
        return usable if self.degrade else usable[:1]

    @property
    def rungs(self) -> tuple[float, ...]:
        """The cache thresholds of the usable rungs."""
        return tuple(rung.threshold for rung in self.levels)

    def floor_speedup(self, steps: int) -> float:
        """Forwards per block at full fidelity over those at the cheapest usable rung, for a plan
        of `steps` steps (compute-bound: a skipped block-step costs nothing)."""
        return (steps + 1) / min(rung.forwards(steps) for rung in self.levels)


class Playout:
    """A viewer's playout clock over one session's video (seconds)."""

    def __init__(self, fps: float):
        self.fps = fps
        self.generated_s = self.played_s = self.stall_s = 0.0
        self.stalls = 0
        self.stalled = False
        self.first_at: float | None = None
        self.last: float | None = None
        self.holds: set[str] = set()

    def advance(self, now: float) -> None:
        """Play from the last update to `now`; stall where the generated video runs out."""
        if self.last is None:  # nothing shown yet: the clock has not started
            return
        if self.holds:  # paused or no viewer: time passes, the video does not
            self.last = now
            return
        elapsed, left = now - self.last, self.generated_s - self.played_s
        self.last = now
        if elapsed <= left:
            self.played_s += elapsed
            return
        self.played_s = self.generated_s
        self.stall_s += elapsed - left
        if not self.stalled:
            self.stalls += 1
            self.stalled = True

    def add(self, frames: int, now: float) -> None:
        self.advance(now)
        if self.first_at is None:
            self.first_at = self.last = now
        self.generated_s += frames / self.fps
        self.stalled = False

    def hold(self, reason: str, now: float) -> None:
        self.advance(now)
        self.holds.add(reason)

    def release(self, reason: str, now: float) -> None:
        self.advance(now)
        self.holds.discard(reason)
        if self.last is not None:
            self.last = now

    def report(self, played_s: float, now: float) -> None:
        """The viewer says how far it has played: that replaces the model's guess."""
        self.advance(now)
        self.played_s = min(max(played_s, 0.0), self.generated_s)

    def slack(self, now: float) -> float:
        self.advance(now)
        return self.generated_s - self.played_s


@dataclass(frozen=True)
class Standing:
    """One session's place at the start of a round."""

    id: str
    slack_s: float
    waited: int
    """Rounds since it was last served while it wanted service."""
    ticks_to_frames: int
    """Ticks until its next block is out (this one included)."""
    started: bool
    """Its viewer has had a frame (its playout clock runs)."""
    served_at: int = 0
    """The round it was last served (fifo order); ties keep arrival order."""


def choose(standings: list[Standing], limits: Limits) -> list[Standing]:
    """The sessions to step this round, at most `limits.batch`, most urgent first."""
    due = [s for s in standings if s.slack_s < limits.target_slack_s]
    if limits.order == "fifo":
        return sorted(due, key=lambda s: s.served_at)[: limits.batch]
    starving = sorted((s for s in due if s.waited >= limits.max_wait_rounds), key=lambda s: -s.waited)
    rest = sorted((s for s in due if s.waited < limits.max_wait_rounds), key=lambda s: (s.slack_s, -s.waited))
    return (starving + rest)[: limits.batch]


def predicted_slack(standing: Standing, round_s: float, due: int, batch: int) -> float:
    """Slack when its next block is out, if it gets its share (batch / due) of the rounds."""
    rounds_per_tick = max(1.0, due / batch)
    return standing.slack_s - standing.ticks_to_frames * round_s * rounds_per_tick


def next_rung(
    level: int, standing: Standing, round_s: float | None, due: int, limits: Limits, video_per_tick: float
) -> int:
    """The session's rung (index into `limits.rungs`) for this round. `video_per_tick`: seconds of
    video a tick yields on average. Capacity is short for a session whose share of the rounds
    yields video slower than it plays: it goes up a rung once its predicted slack is below
    `degrade_below_s`. One that keeps up (a session that just started, say) goes up only when its
    next block would come too late even so."""
    top = len(limits.rungs) - 1
    if not standing.started or round_s is None:
        return min(level, top)
    predicted = predicted_slack(standing, round_s, due, limits.batch)
    keeps_up = video_per_tick >= round_s * max(1.0, due / limits.batch)
    if predicted < 0 or (predicted < limits.degrade_below_s and not keeps_up):
        return min(level + 1, top)
    if predicted > limits.recover_above_s:
        return max(level - 1, 0)
    return min(level, top)


@dataclass
class Throughput:
    """Measured seconds per round, per batch size (exponential moving averages)."""

    smoothing: float = 0.2
    round_s: dict[int, float] = field(default_factory=dict)

    def record(self, batch: int, seconds: float) -> None:
        if seconds <= 0 or batch <= 0:
            return
        old = self.round_s.get(batch)
        self.round_s[batch] = seconds if old is None else old + self.smoothing * (seconds - old)

    def estimate(self, batch: int) -> float | None:
        """Seconds per round at `batch`: measured, else a line through the measured sizes (a cost
        per round plus one per session), else proportional to the one size measured."""
        if batch in self.round_s:
            return self.round_s[batch]
        if not self.round_s:
            return None
        sizes = sorted(self.round_s)
        if len(sizes) == 1:
            return self.round_s[sizes[0]] * batch / sizes[0]
        mean_k = sum(sizes) / len(sizes)
        mean_s = sum(self.round_s[k] for k in sizes) / len(sizes)
        slope = sum((k - mean_k) * (self.round_s[k] - mean_s) for k in sizes) / sum((k - mean_k) ** 2 for k in sizes)
        slope = max(slope, 0.0)
        return max(mean_s + slope * (batch - mean_k), 1e-6)

    def per_session_fps(self, n: int, frames_per_tick: float, limits: Limits, speedup: float = 1.0) -> float | None:
        """Frames per second each of `n` sessions gets when they share the rounds (None: nothing
        measured yet); `speedup`: what lower fidelity adds to the speed measured at full fidelity."""
        if not self.round_s:
            return None
        served = min(n, limits.batch)
        return limits.headroom * speedup * served * frames_per_tick / self.estimate(served) / n

    def sessions(self, fps: float, frames_per_tick: float, limits: Limits, most: int, speedup: float = 1.0):
        """How many sessions the measured speed keeps at `fps` (None: nothing measured yet)."""
        if not self.round_s:
            return None
        fitting = 0
        for n in range(1, most + 1):
            if self.per_session_fps(n, frames_per_tick, limits, speedup) >= fps:
                fitting = n
        return fitting


@dataclass(frozen=True)
class Verdict:
    admit: bool
    reason: str = ""
    memory: bool = True
    """The KV memory has room (a viewer refused for speed alone may be offered a lower rate)."""


def admission(*, running: int, kv_in_use: int, kv_per_session: int, capacity: int | None, limits: Limits) -> Verdict:
    """Whether one more session may run now, and if not, why (one line)."""
    if kv_in_use + kv_per_session > limits.kv_budget_bytes:
        fits = limits.kv_budget_bytes // max(kv_per_session, 1)
        return Verdict(False, f"KV memory is full ({sessions(fits)} of {kv_per_session / 2**20:.1f} MiB fit the "
                       "budget)", memory=False)  # fmt: skip
    capacity = None if capacity is None else max(capacity, 1)  # one session always runs, however slow
    if limits.throughput_admission and capacity is not None and running + 1 > capacity:
        fidelity = "at the quality floor" if limits.admit_at_floor and len(limits.levels) > 1 else "at full fidelity"
        return Verdict(False, f"the engine keeps {sessions(capacity)} at full frame rate {fidelity} and runs {running}")
    return Verdict(True)


def sessions(count: int) -> str:
    """'1 session', '3 sessions'."""
    return f"{count} session" + ("" if count == 1 else "s")
