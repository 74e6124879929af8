"""What a blob of bytes is (by its magic bytes) and whether it is small enough to read.

Only the content decides: a PNG named clip.mp4 is a PNG, a text file named photo.jpg is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class MediaError(ValueError):
    """An image or clip that cannot be used: too large, of another type, or corrupt (one line)."""


@dataclass(frozen=True)
class MediaLimits:
    """The most a caller accepts; checked before anything is decoded."""

    max_bytes: int = 32 * 2**20
    """Size of the file or upload (32 MiB)."""
    max_pixels: int = 4096 * 4096
    """Width x height of one frame (a decompression bomb is refused from its header)."""
    max_frames: int = 1024
    """Frames of a clip (a longer one is refused; trim it first)."""

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_frames) < 1:
            raise ValueError("media limits must be positive")


IMAGE_FORMATS = ("png", "jpeg", "webp", "gif", "bmp")
VIDEO_FORMATS = ("mp4", "webm", "avi")
"""mp4 covers the ISO family (MP4, MOV, M4V); webm covers Matroska (MKV)."""


def sniff(data: bytes) -> str:
    """The format of `data` from its first bytes: one of IMAGE_FORMATS or VIDEO_FORMATS."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM") and len(data) > 26:
        return "bmp"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    known = ", ".join(f.upper() for f in IMAGE_FORMATS + VIDEO_FORMATS)
    raise MediaError(f"not an image or video this engine reads (by its content; it reads {known})")


def read_bytes(source: str | Path | bytes, limits: MediaLimits) -> tuple[bytes, str]:
    """The bytes of `source` (a path or the bytes themselves) and a name for messages; the size is
    checked before a file is read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "upload"
        _check_size(len(data), limits, name)
        return data, name
    path = Path(source)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    _check_size(path.stat().st_size, limits, str(path))
    return path.read_bytes(), str(path)


def _check_size(size: int, limits: MediaLimits, name: str) -> None:
    if size == 0:
        raise MediaError(f"{name}: empty (give an image or a video clip)")
    if size > limits.max_bytes:
        raise MediaError(f"{name}: {size / 2**20:.1f} MiB is over the limit of {limits.max_bytes / 2**20:.1f} MiB")


def check_pixels(width: int, height: int, limits: MediaLimits, name: str) -> None:
    """Refuse a frame size from the header, before decoding allocates it."""
    if width < 1 or height < 1:
        raise MediaError(f"{name}: corrupt (a frame of {width}x{height} pixels)")
    if width * height > limits.max_pixels:
        raise MediaError(
            f"{name}: {width}x{height} frames are over the limit of {limits.max_pixels} pixels; scale it down first"
        )
