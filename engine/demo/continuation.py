"""Ground truth for a stream the model generated itself: the scene continued from what it shows.

A training stream starts from a scene (description, size, background, position, velocity) and
then continues from the model's own blocks. Those drift from the scene they started from: the
shape is a pixel or two off after a few blocks, and after tens of blocks anywhere. A target
rendered from the original trajectory would then ask the model to jump the shape back, which
nothing in its context supports. So after every generated block the scene is re-anchored to it:
the shape's position is read back from the last generated frame, and the next block's target is
rendered from there with the scene's description, size, background and velocity. Everything the
prompt fixes (color, shape, motion) and the background stay true, so the target pulls a
drifting stream back toward a clean picture, while the position follows the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from engine.demo.reading import read_frame
from engine.demo.scenes import (
    BACKGROUNDS,
    RADIUS,
    START_JITTER,
    Description,
    advance,
    background_image,
    random_description,
    render,
    switched,
    velocity_of,
)


@dataclass(frozen=True)
class Scene:
    """One stream's ground truth at a block boundary: where the shape was in the last frame
    shown and the velocity that moves it to the next frame."""

    desc: Description
    radius: float
    background: int
    position: np.ndarray  # (x, y) of the shape in the last frame shown
    velocity: np.ndarray  # (dx, dy) pixels per frame from there

    @property
    def bouncing(self) -> bool:
        return self.desc.motion == "bouncing"


def start_scene(rng: np.random.Generator, size: int, centred: bool) -> Scene:
    """A new stream's scene; the shape's first frame lands at the start position (`centred`: a
    stream's start, within START_JITTER of the centre; else anywhere in view)."""
    desc = random_description(rng)
    radius = float(rng.uniform(*RADIUS))
    background = int(rng.integers(len(BACKGROUNDS)))
    if centred:
        first = size / 2 + rng.uniform(-START_JITTER, START_JITTER, size=2)
    else:
        first = rng.uniform(radius, size - radius, size=2)
    velocity = velocity_of(desc)
    return Scene(desc, radius, background, (first - velocity) % size, velocity)


def render_block(scene: Scene, frames: int, size: int) -> tuple[np.ndarray, Scene]:
    """The next `frames` frames `[frames, size, size, 3]` uint8 and the scene after them."""
    position, velocity, images = scene.position, scene.velocity, []
    for _ in range(frames):
        position, velocity = advance(position, velocity, scene.bouncing, scene.radius, size)
        images.append(render(scene.desc, tuple(position), scene.radius, scene.background, size))
    return np.stack(images), replace(scene, position=position, velocity=velocity)


def switch_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A prompt switch at this block boundary: new attributes, continuing from where the shape is."""
    desc = switched(scene.desc, rng)
    return replace(scene, desc=desc, velocity=velocity_of(desc))


def reanchor(scene: Scene, shown: np.ndarray) -> Scene:
    """`scene` (already advanced past the block the model generated) with the position read from
    the last generated frame `shown` `[H, W, 3]` uint8; unchanged when no shape is seen there (the
    model lost it: the target then redraws it where the scene says it is)."""
    reading = read_frame(shown)
    if reading.center is None:
        return scene
    return replace(scene, position=np.asarray(reading.center, dtype=np.float64))


def read_background(frames: np.ndarray) -> int:
    """The background `[F, H, W, 3]` uint8 frames show: the one nearest to their row medians (the
    shape covers a minority of every row). Used once, on a stream's first generated block, where
    the model chose the background itself."""
    rows = np.median(frames.astype(np.float32), axis=-2).mean(axis=0)  # [H, 3]
    size = frames.shape[1]
    errors = [np.abs(background_image(i, size)[:, 0] - rows).mean() for i in range(len(BACKGROUNDS))]
    return int(np.argmin(errors))
