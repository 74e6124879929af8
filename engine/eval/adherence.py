"""Prompt adherence of demo videos: read the shape's color, shape and motion back from the frames.

Per frame: the background is estimated row by row (the median of each row, since backgrounds
are vertical gradients and the shape covers a minority of every row); pixels far from it are the
shape. Its color is the nearest named color to the mean foreground color; its shape is the
template (circle, square, triangle of the same area, centred on the shape) with the best overlap.
Motion comes from the centre's displacements on the torus: the mean direction (8 compass
directions), or "bouncing" when a velocity component reverses. A reversal is read from velocities
averaged over a few frames, both sides fast: generated shapes wobble by a pixel or so, and a
frame-to-frame sign change of that wobble is not a bounce.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from engine.demo.scenes import COLORS, MOTIONS, SHAPES, Description, foreground, render

FOREGROUND_DISTANCE = 60.0  # summed |RGB difference| from the background that counts as the shape
MIN_PIXELS = 12  # fewer foreground pixels than this: no shape seen
MIN_SPEED = 0.6  # pixels per frame below which the shape counts as still
BOUNCE_WINDOW = 4  # frame steps a velocity is averaged over when looking for a reflection
BOUNCE_SPEED = 0.75  # px/frame each way around a reflection (bouncing moves 1.41 px/frame per axis)
_LINEAR = {name: np.array(v) for name, v in MOTIONS.items() if name != "bouncing"}


@dataclass
class FrameReading:
    color: str | None
    shape: str | None
    center: np.ndarray | None  # (x, y)


@dataclass
class Reading:
    color: str | None
    shape: str | None
    motion: str | None
    frames: list[FrameReading]


def _torus_center(mask: np.ndarray) -> np.ndarray:
    """Circular mean of the mask's coordinates (shapes wrap around the edges)."""
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    center = []
    for coords in (xs, ys):
        angle = (coords + 0.5) / size * 2 * math.pi
        mean = math.atan2(np.sin(angle).mean(), np.cos(angle).mean())
        center.append((mean / (2 * math.pi) * size) % size)
    return np.array(center)


def _template(shape: str, center: np.ndarray, radius: float, size: int) -> np.ndarray:
    return render(Description("white", shape, "left"), tuple(center), radius, 0, size)[..., 0] > 128


def _shape(mask: np.ndarray, center: np.ndarray) -> str:
    """The shape whose template, of the mask's area and at its centre, overlaps it best (IoU)."""
    size, area, scores = mask.shape[0], mask.sum(), {}
    for shape in SHAPES:
        radius = 10.0 * math.sqrt(area / max(_template(shape, center, 10.0, size).sum(), 1))
        template = _template(shape, center, radius, size)
        scores[shape] = (template & mask).sum() / max((template | mask).sum(), 1)
    return max(scores, key=scores.get)


def read_frame(frame: np.ndarray) -> FrameReading:
    mask = foreground(frame, FOREGROUND_DISTANCE)
    if mask.sum() < MIN_PIXELS:
        return FrameReading(None, None, None)
    mean = frame[mask].astype(np.float32).mean(axis=0)
    color = min(COLORS, key=lambda name: np.abs(np.array(COLORS[name]) - mean).sum())
    center = _torus_center(mask)
    return FrameReading(color, _shape(mask, center), center)


def read_motion(centers: list[np.ndarray], size: int) -> str | None:
    """Compass direction of the mean velocity, or bouncing if a velocity component flips sign."""
    if len(centers) < 2:
        return None
    steps = np.array([(b - a + size / 2) % size - size / 2 for a, b in zip(centers, centers[1:])])  # [n, 2]
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
