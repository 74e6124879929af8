"""What the benchmarks share: a session for a preset on a device, and one timed video."""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.config import Preset, SpeedConfig
from engine.devices import resolve_dtype
from engine.runtime.outputs import RunStats
from engine.runtime.session import Session
from engine.weight_paths import WeightPaths
from launch.build import EAGER, build_session
from launch.threads import configure_threads


def session_for(
    preset: Preset,
    device: torch.device,
    weights: WeightPaths | None = None,
    dtype: torch.dtype | None = None,
    speed: SpeedConfig = EAGER,
) -> Session:
    """The preset's session with its default weights (or `weights`), at the device's default dtype
    (or `dtype`), with the CPU thread policy the commands use (launch/threads.py)."""
    dtype = dtype or resolve_dtype("auto", device)
    session = build_session(preset, weights or WeightPaths(), device, dtype, speed=speed)
    configure_threads(None, session.model, device)
    return session


def generate_video(session: Session, prompt, blocks: int, seed: int) -> tuple[np.ndarray, RunStats, float]:
    """Decoded frames `[N, H, W, 3]` uint8 of one run, its stats, and its wall-clock seconds."""
    start = time.perf_counter()
    run = session.run(prompt, blocks=blocks, seed=seed)
    frames = np.concatenate([f for _, f in run.frames()])
    return frames, run.stats, time.perf_counter() - start
