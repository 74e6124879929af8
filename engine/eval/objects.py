"""How many copies of the described object a frame shows: a second blob of its color is a split.

A demo scene holds one object. A model that is unsure where the object goes can draw it twice
(two copies drifting apart) or leave a ghost where it was. Per frame: the foreground (the pixels
`read_frame` counts as the shape), cut into blobs that touch on the torus (4-neighbours; shapes
wrap around the edges, so a shape crossing an edge is one blob), and the blobs of at least
MIN_PIXELS pixels whose mean color reads as the described color. Pure functions of uint8 frames.
"""

from __future__ import annotations

import numpy as np

from engine.demo.reading import FOREGROUND_DISTANCE, MIN_PIXELS
from engine.demo.scenes import COLORS, foreground


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The connected parts of a `[H, W]` bool mask on the torus, each as `[n, 2]` (y, x) indices."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    parts = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x], stack, members = True, [(y, x)], []
        while stack:
            a, b = stack.pop()
            members.append((a, b))
            for c, d in ((a + 1) % height, b), ((a - 1) % height, b), (a, (b + 1) % width), (a, (b - 1) % width):
                if mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
        parts.append(np.array(members))
    return parts


def copies(frame: np.ndarray, color: str) -> int:
    """Blobs of at least MIN_PIXELS pixels in `frame` `[H, W, 3]` uint8 whose mean color is
    nearest to `color` among the named colors."""
    count = 0
    for part in blobs(foreground(frame, FOREGROUND_DISTANCE)):
        if len(part) < MIN_PIXELS:
            continue
        mean = frame[part[:, 0], part[:, 1]].astype(np.float32).mean(axis=0)
        count += min(COLORS, key=lambda name: np.abs(np.array(COLORS[name]) - mean).sum()) == color
    return count


def split_share(frames: np.ndarray, color: str) -> float:
    """Share of frames `[F, H, W, 3]` showing two or more copies of an object of `color`."""
    if not len(frames):
        return float("nan")
    return float(np.mean([copies(frame, color) >= 2 for frame in frames]))
