"""Decode an image (Pillow) or a clip (PyAV) into uint8 frames `[T, H, W, 3]`, within limits.

An image is one frame (an animated GIF or WebP: its first). A clip's frames are all decoded, in
order, up to `max_frames`; its audio is ignored.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.media.sniff import IMAGE_FORMATS, MediaError, MediaLimits, check_pixels, read_bytes, sniff


@dataclass(frozen=True)
class Media:
    frames: np.ndarray
    """`[T, H, W, 3]` uint8 RGB (T = 1 for an image)."""
    format: str
    """What the content was (engine.media.sniff's names)."""
    fps: float | None = None
    """A clip's frame rate, if its container says; None for an image."""

    @property
    def is_image(self) -> bool:
        return self.format in IMAGE_FORMATS


def load_media(source: str | Path | bytes, limits: MediaLimits | None = None) -> Media:
    """An image or a clip, whichever the content is."""
    limits = limits or MediaLimits()
    data, name = read_bytes(source, limits)
    kind = _sniffed(data, name)
    return _image(data, kind, name, limits) if kind in IMAGE_FORMATS else _video(data, kind, name, limits)


def load_image(source: str | Path | bytes, limits: MediaLimits | None = None) -> Media:
    """An image only (a clip is refused)."""
    limits = limits or MediaLimits()
    data, name = read_bytes(source, limits)
    kind = _sniffed(data, name)
    if kind not in IMAGE_FORMATS:
        raise MediaError(f"{name}: a {kind.upper()} video where an image was expected (PNG, JPEG, WebP, GIF, BMP)")
    return _image(data, kind, name, limits)


def load_video(source: str | Path | bytes, limits: MediaLimits | None = None) -> Media:
    """A clip; an image is accepted as a clip of one frame."""
    return load_media(source, limits)


def _sniffed(data: bytes, name: str) -> str:
    try:
        return sniff(data)
    except MediaError as err:
        raise MediaError(f"{name}: {err}") from None


def _image(data: bytes, kind: str, name: str, limits: MediaLimits) -> Media:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            check_pixels(image.width, image.height, limits, name)
            image.seek(0)
            frame = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except MediaError:
        raise
    except Image.DecompressionBombError:  # Pillow's own, far higher, limit: refused on opening
        raise MediaError(
            f"{name}: its frame is over the limit of {limits.max_pixels} pixels; scale it down first"
        ) from None
    except Exception as err:  # Pillow's errors differ per format (OSError, SyntaxError, ValueError, ...)
        raise MediaError(f"{name}: corrupt {kind.upper()} image ({_first_line(err)})") from None
    return Media(frame[None].copy(), kind)


def _video(data: bytes, kind: str, name: str, limits: MediaLimits) -> Media:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError(f"{name}: a {kind.upper()} file without a video stream")
            stream = container.streams.video[0]
            check_pixels(stream.codec_context.width, stream.codec_context.height, limits, name)
            frames = _decoded(container, stream, limits, name)
            fps = float(stream.average_rate) if stream.average_rate else None
    except MediaError:
        raise
    except Exception as err:  # FFmpeg's errors (InvalidDataError, ...) and PyAV's own
        raise MediaError(f"{name}: corrupt {kind.upper()} video ({_first_line(err)})") from None
    if not frames:
        raise MediaError(f"{name}: a {kind.upper()} video without any decodable frame")
    return Media(np.stack(frames), kind, fps)


def _decoded(container, stream, limits: MediaLimits, name: str) -> list[np.ndarray]:
    """The stream's frames as RGB arrays; each frame's real size is checked again (a header may lie)."""
    frames = []
    for frame in container.decode(stream):
        check_pixels(frame.width, frame.height, limits, name)
        if len(frames) == limits.max_frames:
            raise MediaError(f"{name}: more than {limits.max_frames} frames; trim the clip first")
        frames.append(frame.to_ndarray(format="rgb24"))
        if frames[-1].shape != frames[0].shape:
            raise MediaError(f"{name}: frames change size mid-clip ({frames[0].shape[:2]} -> {frames[-1].shape[:2]})")
    return frames


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
