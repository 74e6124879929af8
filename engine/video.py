"""MP4 (H.264) writing and reading with PyAV, frame by frame as blocks arrive."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class Mp4Writer:
    """Append `[N, H, W, 3]` uint8 frames to an H.264 MP4; `close()` flushes the encoder."""

    def __init__(self, path: str | Path, *, fps: int, width: int, height: int, crf: int = 18):
        if width % 2 or height % 2:
            raise ValueError(f"H.264 with yuv420p needs even sizes, got {width}x{height}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._container = av.open(str(path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps, 1))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            packet_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            self._container.mux(self._stream.encode(packet_frame))
            self.frames_written += 1

    def close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video as `[N, H, W, 3]` uint8."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
