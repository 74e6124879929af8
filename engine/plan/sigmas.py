"""Noise schedules: the sigma of every step, and the time the network is told at each step.

Three families:
* explicit timesteps (Self-Forcing, CausVid, LongLive): sigma = t / 1000, optionally warped by the
  shift; the network sees t = 1000 * sigma exactly (fractional t such as 937.5 included);
* evenly spaced flow sigmas (SkyReels-V2 through diffusers' flow UniPC): sigma = shift(linspace(1,
  1/1000, n + 1)[:-1]), the first nudged below 1, stored in float32; the network sees the integer
  part of 1000 * sigma, as diffusers passes `timesteps.to(int64)`;
* MAGI-1's grid (`magi_times`), sigma = 1 - t; the network sees 1000 * sigma (its adapter turns
  that back into t).

The solver uses `sigmas` (S + 1 values ending at 0); the network uses `model_t`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import SamplingConfig

TRAIN_TIMESTEPS = 1000
FIRST_SIGMA_NUDGE = 1e-6  # keeps log(alpha) finite at sigma = 1 in UniPC's first steps


def shift_sigma(sigma, shift: float):
    """Flow shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma) (scalars or arrays)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


@dataclass(frozen=True)
class Schedule:
    sigmas: tuple[float, ...]
    """S + 1 noise levels: sigmas[s] before step s, sigmas[S] = 0 (clean)."""
    model_t: tuple[float, ...]
    """S network time inputs (0-1000 units), one per step."""
    noise_t: float
    """Time given to frames that have not started (still pure noise) when they are computed."""
    commit_t: float
    """Time of the pass that writes a finished block's clean K/V."""

    @property
    def steps(self) -> int:
        return len(self.model_t)


def _explicit(cfg: SamplingConfig) -> Schedule:
    sigmas = [t / TRAIN_TIMESTEPS for t in cfg.timesteps]
    if cfg.warp:
        sigmas = [shift_sigma(s, cfg.shift) for s in sigmas]
    return Schedule(
        sigmas=tuple(sigmas) + (0.0,),
        model_t=tuple(TRAIN_TIMESTEPS * s for s in sigmas),
        noise_t=float(TRAIN_TIMESTEPS),
        commit_t=TRAIN_TIMESTEPS * cfg.commit_sigma,
    )


def _flow_linspace(cfg: SamplingConfig) -> Schedule:
    sigmas = np.linspace(1.0, 1.0 / TRAIN_TIMESTEPS, cfg.num_steps + 1)[:-1]
    sigmas = shift_sigma(sigmas, cfg.shift)
    if abs(sigmas[0] - 1.0) < FIRST_SIGMA_NUDGE:
        sigmas[0] -= FIRST_SIGMA_NUDGE
    model_t = (sigmas * TRAIN_TIMESTEPS).astype(np.int64)  # truncation, as diffusers does
    stored = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # the solver works from float32 sigmas
    return Schedule(
        sigmas=tuple(float(s) for s in stored),
        model_t=tuple(float(t) for t in model_t),
        noise_t=float(TRAIN_TIMESTEPS - 1),  # SkyReels feeds 999 to frames that have not started
        commit_t=TRAIN_TIMESTEPS * cfg.commit_sigma,
    )


MAGI_SHIFT = 3.0


def magi_times(num_steps: int, shortcut: tuple[int, int, int] = (8, 16, 16)) -> np.ndarray:
    """MAGI-1's `init_t`: S + 1 times in its own convention (t = 0 noise, 1 clean), float64.

    t = linspace(0, 1, S + 1) squared, then the SD3 shift of 3 applied toward the noise end
    (t' = t / (3 - 2t)), which puts t = 0.0217 / 0.1 / 0.3 at the quarter steps — MAGI-1's
    guidance buckets. With 12 steps, the shortcut grid instead: each quarter of [0, 1] split into
    steps of 1/shortcut[i] of the whole, before the same square and shift.
    """
    if num_steps == 12:
        sizes = [1.0 / n for n in shortcut] * 4
        grid = np.concatenate([[0.0], np.cumsum(sizes)])
    else:
        grid = np.linspace(0.0, 1.0, num_steps + 1)
    grid = grid**2
    return grid / MAGI_SHIFT / (1.0 + (1.0 / MAGI_SHIFT - 1.0) * grid)


def _magi(cfg: SamplingConfig) -> Schedule:
    sigmas = 1.0 - magi_times(cfg.num_steps, cfg.shortcut)
    sigmas[-1] = 0.0
    return Schedule(
        sigmas=tuple(float(s) for s in sigmas),
        model_t=tuple(float(TRAIN_TIMESTEPS * s) for s in sigmas[:-1]),
        noise_t=float(TRAIN_TIMESTEPS),
        commit_t=TRAIN_TIMESTEPS * cfg.commit_sigma,
    )


def build_schedule(cfg: SamplingConfig) -> Schedule:
    if cfg.timesteps is not None:
        return _explicit(cfg)
    return _magi(cfg) if cfg.spacing == "magi" else _flow_linspace(cfg)
