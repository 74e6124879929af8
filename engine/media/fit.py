"""Frames of any size made the stream's size: center-crop to its aspect ratio, then resize.

A frame of another resolution is not an error: the largest centered region with the stream's
aspect ratio is kept (the rest, on two opposite sides, is cut) and scaled to exactly
`height x width` with Pillow's Lanczos filter (area-like when shrinking, smooth when enlarging).
Frames already of that size come back unchanged.
"""

from __future__ import annotations

import numpy as np


def crop_box(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centered region of `target_h:target_w` aspect."""
    if width * target_h > height * target_w:  # wider than the target: cut left and right
        kept = max(1, round(height * target_w / target_h))
        left = (width - kept) // 2
        return left, 0, left + kept, height
    kept = max(1, round(width * target_h / target_w))  # taller: cut top and bottom
    top = (height - kept) // 2
    return 0, top, width, top + kept


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[T, H, W, 3]` uint8 -> `[T, height, width, 3]` uint8 (center-crop + resize)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (height, width):
        return frames
    from PIL import Image

    box = crop_box(frames.shape[1], frames.shape[2], height, width)
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.LANCZOS, box=box))
    return out
