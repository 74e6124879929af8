"""Synthetic training video: one shape moving over a dark background, described by a short prompt.

"a red circle moving left", "a cyan triangle moving up right", "a white square bouncing".
Shapes move on a torus (leaving one edge, they come back at the other) so endless streams keep
them in view; "bouncing" shapes start down-right and reflect off the edges. A clip may switch to
another description at a block boundary: from then on the shape takes the new color, shape and
motion, continuing from where it is. Everything is deterministic from a seed.

A stream starts with the shape near the centre (`centred=True`): then a prompt fixes its first
block up to the background and a few pixels, which is what lets a 1.8M-parameter model sample it
in 4 steps (with the position free, the first block's denoiser can only predict a blur of every
position). Later blocks get their position from the context they continue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 250),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "white": (240, 240, 240),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
_DIAGONAL = 1 / math.sqrt(2)
MOTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy), y down
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up left": (-_DIAGONAL, -_DIAGONAL),
    "up right": (_DIAGONAL, -_DIAGONAL),
    "down left": (-_DIAGONAL, _DIAGONAL),
    "down right": (_DIAGONAL, _DIAGONAL),
    "bouncing": (_DIAGONAL, _DIAGONAL),  # starts down-right, then reflects
}
BACKGROUNDS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (  # (top, bottom) colors
    ((12, 12, 16), (12, 12, 16)),
    ((48, 48, 52), (48, 48, 52)),
    ((10, 18, 40), (30, 12, 30)),
    ((20, 36, 24), (8, 12, 10)),
)
SPEED = 2.0  # pixels per frame
RADIUS = (8.0, 9.5)  # half size of the shape, pixels
START_JITTER = 2.0  # pixels around the centre where a stream's shape starts


@dataclass(frozen=True)
class Description:
    color: str
    shape: str
    motion: str

    @property
    def prompt(self) -> str:
        verb = "bouncing" if self.motion == "bouncing" else f"moving {self.motion}"
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} {verb}"


def all_descriptions() -> list[Description]:
    return [Description(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]


def parse_prompt(prompt: str) -> Description | None:
    """The description a prompt names, or None if it is not one of the demo's prompts."""
    words = prompt.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if "bouncing" in words:
        motion = "bouncing"
    else:
        vertical = next((w for w in words if w in ("up", "down")), None)
        horizontal = next((w for w in words if w in ("left", "right")), None)
        motion = " ".join(w for w in (vertical, horizontal) if w) or None
    if color is None or shape is None or motion is None:
        return None
    return Description(color, shape, motion)


@dataclass
class Clip:
    frames: np.ndarray  # [F, H, W, 3] uint8
    prompts: list[str]  # one per frame
    centers: np.ndarray  # [F, 2] (x, y) of the shape, for tests and metrics


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - radius * 0.85
    # upward equilateral triangle with circumradius ~radius * 1.25: intersection of three half-planes
    r = radius * 1.25
    edges = [(0.0, 1.0, r / 2), (math.sqrt(3) / 2, -0.5, r / 2), (-math.sqrt(3) / 2, -0.5, r / 2)]
    return np.max([nx * dx + ny * dy - d for nx, ny, d in edges], axis=0)


def background_image(index: int, size: int) -> np.ndarray:
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[index])
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()


def foreground(frames: np.ndarray, distance: float) -> np.ndarray:
    """`[..., H, W]` bool: pixels of uint8 frames `[..., H, W, 3]` whose summed |RGB difference|
    from their row's median exceeds `distance`. Backgrounds are vertical gradients and the shape
    covers a minority of every row, so the row median is the background."""
    pixels = frames.astype(np.float32)
    return np.abs(pixels - np.median(pixels, axis=-2, keepdims=True)).sum(axis=-1) > distance


def render(desc: Description, center: tuple[float, float], radius: float, background: int, size: int) -> np.ndarray:
    """One frame `[size, size, 3]` uint8 with anti-aliased edges, wrapping around the borders."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx = (xs - center[0] + size / 2) % size - size / 2  # torus distance
    dy = (ys - center[1] + size / 2) % size - size / 2
    coverage = np.clip(0.5 - _signed_distance(desc.shape, dx, dy, radius), 0.0, 1.0)[..., None]
    color = np.array(COLORS[desc.color], dtype=np.float32)
    frame = background_image(background, size) * (1 - coverage) + color * coverage
    return np.clip(frame.round(), 0, 255).astype(np.uint8)


def velocity_of(desc: Description) -> np.ndarray:
    """(dx, dy) pixels per frame of a description's motion (bouncing: its starting direction)."""
    return SPEED * np.array(MOTIONS[desc.motion])


def advance(position: np.ndarray, velocity: np.ndarray, bouncing: bool, radius: float, size: int):
    """One frame of motion: the next (position, velocity); bouncing shapes reflect off the edges."""
    position = position + velocity
    if bouncing:  # reflect off the edges, keeping the whole shape in view
        for axis in (0, 1):
            if position[axis] < radius or position[axis] > size - radius:
                velocity = velocity.copy()
                velocity[axis] = -velocity[axis]
                position[axis] = np.clip(position[axis], radius, size - radius)
    return position % size, velocity


def random_description(rng: np.random.Generator) -> Description:
    return Description(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), str(rng.choice(list(MOTIONS))))


def make_clip(
    rng: np.random.Generator,
    *,
    frames: int,
    size: int = 64,
    block_frames: int = 3,
    switch_probability: float = 0.0,
    description: Description | None = None,
    centred: bool = False,
) -> Clip:
    """A clip of `frames` frames; with `switch_probability` its description changes at a block
    boundary. `centred`: a stream's start (shape near the centre); else anywhere (mid-stream)."""
    desc = description or random_description(rng)
    radius = float(rng.uniform(*RADIUS))
    background = int(rng.integers(len(BACKGROUNDS)))
    if centred:
        position = size / 2 + rng.uniform(-START_JITTER, START_JITTER, size=2)
    else:
        position = rng.uniform(radius, size - radius, size=2)
    velocity = velocity_of(desc)
    switch_at = -1
    if frames > block_frames and rng.random() < switch_probability:
        switch_at = int(rng.integers(1, frames // block_frames)) * block_frames
    images, prompts, centers = [], [], []
    for f in range(frames):
        if f == switch_at:
            desc = switched(desc, rng)
            velocity = velocity_of(desc)
        images.append(render(desc, tuple(position), radius, background, size))
        prompts.append(desc.prompt)
        centers.append(position.copy())
        position, velocity = advance(position, velocity, desc.motion == "bouncing", radius, size)
    return Clip(np.stack(images), prompts, np.stack(centers))


def switched(desc: Description, rng: np.random.Generator) -> Description:
    """Change one, two or all three attributes."""
    other = random_description(rng)
    keep = rng.random(3) < 0.5
    keep[rng.integers(3)] = False  # at least one attribute changes
    changed = replace(
        desc,
        color=desc.color if keep[0] else other.color,
        shape=desc.shape if keep[1] else other.shape,
        motion=desc.motion if keep[2] else other.motion,
    )
    return changed if changed != desc else replace(desc, color=next(c for c in COLORS if c != desc.color))
