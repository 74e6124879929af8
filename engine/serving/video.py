"""MP4 (H.264) writing and reading with PyAV, frame by frame as blocks arrive."""

from __future__ import annotations

import queue
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np

# BT.601 limited-range RGB -> YCbCr (what players assume for SD H.264 without colour tags).
_RGB_TO_YUV = (
    np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=np.float32)
    / 255.0
)
_YUV_OFFSET = np.array([16.0, 128.0, 128.0], dtype=np.float32)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB -> `[H * 3 / 2, W]` uint8 planar YUV 4:2:0 (chroma averaged over 2x2).

    Converting here rather than in FFmpeg's swscale keeps files byte-identical across runs:
    swscale's conversion was seen to vary with process state for identical input frames.
    """
    height, width, _ = frame.shape
    yuv = frame.astype(np.float32) @ _RGB_TO_YUV.T + _YUV_OFFSET  # [H, W, 3]
    luma = yuv[..., 0]
    chroma = yuv[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))  # [H/2, W/2, 2]
    planes = [luma.ravel(), chroma[..., 0].ravel(), chroma[..., 1].ravel()]
    out = np.concatenate(planes).round().clip(0, 255).astype(np.uint8)
    return out.reshape(height * 3 // 2, width)


class Mp4Writer:
    """Append `[N, H, W, 3]` uint8 frames to an H.264 MP4 from a dedicated encoder thread.

    The encoder thread overlaps encoding with generation, and it makes files reproducible:
    x264 run on a thread where torch's CPU kernels had run produced different bytes for
    identical input now and then (per-thread floating-point state), on a fresh thread never.
    `write` blocks only when `max_pending` batches are waiting; `close()` flushes and re-raises
    any encoder error. The file is fragmented MP4 with a keyframe every second: if the process is
    killed, everything up to the last completed fragment stays playable.
    """

    def __init__(self, path: str | Path, *, fps: int, width: int, height: int, crf: int = 18, max_pending: int = 8):
        if width % 2 or height % 2:
            raise ValueError(f"H.264 with yuv420p needs even sizes, got {width}x{height}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.frames_written = 0
        self._settings = (fps, width, height, crf)
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._encode_all, name="mp4-writer", daemon=True)
        self._thread.start()

    def _encode_all(self) -> None:
        fps, width, height, crf = self._settings
        try:
            options = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}
            import av  # here, not at import: a command that writes no video does not load it

            with av.open(str(self.path), mode="w", options=options) as container:
                stream = container.add_stream("libx264", rate=Fraction(fps, 1))
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast", "g": str(fps)}
                while (frames := self._next()) is not None:
                    for frame in frames:
                        container.mux(
                            stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p"))
                        )
                container.mux(stream.encode(None))
        except BaseException as err:  # reported to the caller by write()/close()
            self._error = err
            while not self._closing:  # keep draining so the producer never blocks
                self._next()

    def _next(self) -> np.ndarray | None:
        frames = self._queue.get()
        self._closing = frames is None
        return frames

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"encoding {self.path} failed: {self._error}") from self._error

    def write(self, frames: np.ndarray) -> None:
        self._raise_if_failed()
        if (
            frames.ndim != 4
            or frames.shape[1:] != (self._settings[2], self._settings[1], 3)
            or frames.dtype != np.uint8
        ):
            raise ValueError(
                f"expected uint8 frames [N, {self._settings[2]}, {self._settings[1]}, 3], "
                f"got {frames.dtype} {frames.shape}"
            )
        self._queue.put(frames.copy())
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video as `[N, H, W, 3]` uint8."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
