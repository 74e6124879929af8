"""Prompt adherence of demo videos: read the shape's color, shape and motion back from the frames.

Per frame, engine/demo/reading.py reads the shape's color, shape and centre. Motion comes from
the centre's displacements on the torus: the mean direction (8 compass directions), or
"bouncing" when a velocity component reverses. A reversal is read from velocities
averaged over a few frames, both sides fast: generated shapes wobble by a pixel or so, and a
frame-to-frame sign change of that wobble is not a bounce.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from engine.demo.reading import FrameReading, read_frame
from engine.demo.scenes import MOTIONS, Description

MIN_SPEED = 0.6  # pixels per frame below which the shape counts as still
BOUNCE_WINDOW = 4  # frame steps a velocity is averaged over when looking for a reflection
BOUNCE_SPEED = 0.75  # px/frame each way around a reflection (bouncing moves 1.41 px/frame per axis)
_LINEAR = {name: np.array(v) for name, v in MOTIONS.items() if name != "bouncing"}


@dataclass
class Reading:
    color: str | None
    shape: str | None
    motion: str | None
    frames: list[FrameReading]


def torus_steps(centers: list[np.ndarray], size: int) -> np.ndarray:
    """`[n - 1, 2]`: each displacement from one center to the next, the short way round the torus."""
    return np.array([(b - a + size / 2) % size - size / 2 for a, b in zip(centers, centers[1:])]).reshape(-1, 2)


def read_motion(centers: list[np.ndarray], size: int) -> str | None:
    """Compass direction of the mean velocity, or bouncing if a velocity component flips sign."""
    if len(centers) < 2:
        return None
    steps = torus_steps(centers, size)
    if _reflects(steps):
        return "bouncing"
    mean = steps.mean(axis=0)
    if np.linalg.norm(mean) < MIN_SPEED:
        return None
    unit = mean / np.linalg.norm(mean)
    return max(_LINEAR, key=lambda name: float(unit @ _LINEAR[name]))


def _reflects(steps: np.ndarray) -> bool:
    """Whether a velocity component, averaged over `BOUNCE_WINDOW` steps, is fast one way in one
    stretch and fast the other way in another."""
    window = min(BOUNCE_WINDOW, len(steps))
    kernel = np.ones(window) / window
    for axis in (0, 1):
        velocity = np.convolve(steps[:, axis], kernel, mode="valid")
        if velocity.max() > BOUNCE_SPEED and velocity.min() < -BOUNCE_SPEED:
            return True
    return False


def _majority(values) -> str | None:
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def read_video(frames: np.ndarray) -> Reading:
    readings = [read_frame(f) for f in frames]
    centers = [r.center for r in readings if r.center is not None]
    return Reading(
        color=_majority(r.color for r in readings),
        shape=_majority(r.shape for r in readings),
        motion=read_motion(centers, frames.shape[1]),
        frames=readings,
    )


def _wrapped(centers: list[np.ndarray], size: int) -> bool:
    return any(np.abs(b - a).max() > size / 2 for a, b in zip(centers, centers[1:]))


def motion_matches(reading: Reading, motion: str, size: int) -> bool:
    """A bouncing shape that reaches no edge within the clip moves diagonally; it never wraps."""
    if motion == "bouncing" and reading.motion in ("up left", "up right", "down left", "down right"):
        return not _wrapped([r.center for r in reading.frames if r.center is not None], size)
    return reading.motion == motion


def adherence(frames: np.ndarray, desc: Description) -> dict[str, bool]:
    """Whether the video shows the described color, shape and motion."""
    reading = read_video(frames)
    return {
        "color": reading.color == desc.color,
        "shape": reading.shape == desc.shape,
        "motion": motion_matches(reading, desc.motion, frames.shape[1]),
    }


def blocks_to_follow(frames: np.ndarray, desc: Description, switch_frame: int, block_frames: int, window: int = 2):
    """Blocks after a prompt switch until a `window`-block stretch of video matches `desc` in all
    three attributes (0 = the first block after the switch already does); None if never."""
    blocks = (len(frames) - switch_frame) // block_frames
    for offset in range(blocks - window + 1):
        start = switch_frame + offset * block_frames
        if all(adherence(frames[start : start + window * block_frames], desc).values()):
            return offset
    return None
