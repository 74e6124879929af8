"""A clip read frame by frame (PyAV), for video in: frames reach the engine as it takes them.

Unlike a whole-clip loader, nothing but the current frame is held, so a long clip streams in
constant memory. `ClipError` is the one-line refusal (no such file, not a video, nothing decodes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


class ClipError(ValueError):
    """A clip that cannot be read: one line saying what is wrong."""


def clip_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """The clip's video frames in order, each uint8 `[H, W, 3]` RGB; its audio is ignored.

    The file is opened and its first frame decoded before this returns, so a bad path or a file
    that is not a video is refused here, not in the middle of a stream."""
    import av  # here, not at import: a run without video in does not load it

    path = Path(path)
    if not path.is_file():
        raise ClipError(f"{path}: no such clip (give a video file, e.g. an MP4)")
    try:
        container = av.open(str(path))
        decoded = container.decode(video=0)
        first = next(decoded)
    except (av.FFmpegError, StopIteration, IndexError, ValueError) as err:
        raise ClipError(f"{path}: not a readable video ({type(err).__name__}); give an MP4, WebM or MOV clip") from err
    return _frames(container, first, decoded, max_frames)


def _frames(container, first, decoded, max_frames: int | None) -> Iterator[np.ndarray]:
    import av

    try:
        count, frame = 0, first
        while frame is not None and (max_frames is None or count < max_frames):
            yield frame.to_ndarray(format="rgb24")
            count += 1
            try:
                frame = next(decoded)
            except (StopIteration, av.FFmpegError):  # a damaged tail ends the clip where it breaks
                frame = None
    finally:
        container.close()
