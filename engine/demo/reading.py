"""Read one frame of a demo scene back: the shape's color, shape and centre (None when none shows).

The background is estimated row by row (the median of each row, since backgrounds are vertical
gradients and the shape covers a minority of every row); pixels far from it are the shape. Its
color is the nearest named color to the mean foreground color; its shape is the template
(circle, square, triangle of the same area, centred on the shape) with the best overlap.
Continuations (engine/demo/continuation.py) and the adherence measures (engine/eval/) read
frames with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.demo.scenes import COLORS, SHAPES, Description, foreground, render

FOREGROUND_DISTANCE = 60.0  # summed |RGB difference| from the background that counts as the shape
MIN_PIXELS = 12  # fewer foreground pixels than this: no shape seen


@dataclass
class FrameReading:
    color: str | None
    shape: str | None
    center: np.ndarray | None  # (x, y)


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
