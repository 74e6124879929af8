"""Long-horizon quality of demo videos, read from the frames: is the object still there, still
the described one, still moving, and has the background kept its brightness?

A stream that suffers from exposure bias keeps the prompt for a while and then degrades: the
dark background brightens toward grey and the shape fades. So, per stretch of blocks (a
horizon): the adherence of `engine.eval.adherence` on that stretch, the fraction of frames where
an object is seen at all, and the background's mean brightness and its drift from the video's
first seconds. Pure functions of uint8 frames `[F, H, W, 3]`.
"""

from __future__ import annotations

import numpy as np

from engine.demo.reading import FOREGROUND_DISTANCE, MIN_PIXELS
from engine.demo.scenes import Description, foreground
from engine.eval.adherence import adherence


def parse_horizon(text: str) -> tuple[int, int]:
    """Blocks [50, 60) from "50-60" (the end is excluded, so "0-8" is the first 8 blocks)."""
    start, sep, end = text.partition("-")
    if not sep or not start.isdigit() or not end.isdigit() or int(end) <= int(start):
        raise ValueError(f"a horizon is FIRST-END in blocks with END > FIRST, e.g. 50-60; got {text!r}")
    return int(start), int(end)


def presence(frames: np.ndarray) -> float:
    """Fraction of frames in which an object is seen: enough pixels differ from the background
    (the test `read_frame` applies before reading anything else)."""
    if not len(frames):
        return float("nan")
    return float((foreground(frames, FOREGROUND_DISTANCE).sum(axis=(1, 2)) >= MIN_PIXELS).mean())


def background_brightness(frames: np.ndarray) -> np.ndarray:
    """`[F]`: mean of the RGB values (0-255) of each frame's background pixels (the shape excluded)."""
    shape = foreground(frames, FOREGROUND_DISTANCE)  # [F, H, W]
    pixels = frames.astype(np.float32).mean(axis=-1)  # [F, H, W]
    background = ~shape
    return (pixels * background).sum(axis=(1, 2)) / np.maximum(background.sum(axis=(1, 2)), 1)


def horizon_scores(frames: np.ndarray, desc: Description, baseline: float) -> dict[str, float]:
    """One stretch of a video: adherence (1.0 / 0.0 per attribute), presence, background brightness
    and its drift from `baseline` (the brightness of the video's first seconds)."""
    scores = {name: float(value) for name, value in adherence(frames, desc).items()}
    brightness = float(background_brightness(frames).mean())
    return {**scores, "present": presence(frames), "brightness": brightness, "drift": brightness - baseline}


def summarize(per_video: list[dict[str, float]]) -> dict[str, float]:
    """Means over videos; `all_three`: the share of videos right in color, shape and motion;
    `abs_drift`: the mean size of the drift (brightening and darkening do not cancel)."""
    keys = ("color", "shape", "motion", "present", "brightness", "drift")
    out = {k: float(np.mean([v[k] for v in per_video])) for k in keys}
    out["all_three"] = float(np.mean([v["color"] and v["shape"] and v["motion"] for v in per_video]))
    out["abs_drift"] = float(np.mean([abs(v["drift"]) for v in per_video]))
    return out
