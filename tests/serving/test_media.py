"""Images and clips read by content, within limits, with one-line errors (engine/media/).

pytest tests/serving/test_media.py
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.media import MediaError, MediaLimits, fit_frames, load_image, load_media, sniff
from engine.serving.video import Mp4Writer


def png_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def lying_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims `width x height` (a decompression bomb's header)."""
    data = bytearray(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def clip(path, frames: int = 5, size: int = 32) -> np.ndarray:
    video = np.zeros((frames, size, size, 3), np.uint8)
    for i in range(frames):
        video[i, 8:16, 4 + 3 * i : 12 + 3 * i] = (220, 40, 40)
    with Mp4Writer(path, fps=8, width=size, height=size) as writer:
        writer.write(video)
    return video


def test_images_and_clips_are_read_by_content(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    misnamed = tmp_path / "photo.mp4"  # the name lies; the content decides
    misnamed.write_bytes(png_bytes(frame))
    image = load_media(misnamed)
    assert image.is_image and image.format == "png" and np.array_equal(image.frames[0], frame)
    source = clip(tmp_path / "clip.mp4")
    video = load_media((tmp_path / "clip.mp4").read_bytes())
    assert video.format == "mp4" and not video.is_image and video.frames.shape == source.shape
    assert np.abs(video.frames.astype(int) - source).mean() < 8  # H.264 is lossy, not wrong
    jpeg = io.BytesIO()
    Image.fromarray(frame).save(jpeg, format="JPEG")
    assert sniff(jpeg.getvalue()) == "jpeg" and load_image(jpeg.getvalue()).frames.shape == (1, 12, 20, 3)


@pytest.mark.parametrize(
    "data, limits, says",
    [
        (b"hello, not a picture at all", None, "not an image or video"),
        (b"", None, "empty"),
        (lying_png(5000, 5000), None, "5000x5000 frames are over the limit"),
        (b"\x00" * 2048, MediaLimits(max_bytes=1024), "over the limit of"),
        (lying_png(100_000, 100_000), None, "over the limit of .* pixels"),
        (png_bytes(np.zeros((8, 8, 3), np.uint8))[:40], None, "corrupt PNG image"),
        (b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64, None, "corrupt MP4 video"),
    ],
    ids=["wrong-type", "empty", "too-many-pixels", "too-many-bytes", "bomb", "corrupt-png", "corrupt-mp4"],
)
def test_hostile_inputs_get_one_line_errors(data, limits, says):
    with pytest.raises(MediaError, match=says) as caught:
        load_media(data, limits)
    assert "\n" not in str(caught.value)


def test_limits_on_frames_and_kind(tmp_path):
    clip(tmp_path / "c.mp4", frames=5)
    with pytest.raises(MediaError, match="more than 3 frames; trim the clip"):
        load_media(tmp_path / "c.mp4", MediaLimits(max_frames=3))
    with pytest.raises(MediaError, match="MP4 video where an image was expected"):
        load_image(tmp_path / "c.mp4")
    with pytest.raises(MediaError, match="no such file"):
        load_media(tmp_path / "missing.png")


def test_other_resolutions_are_center_cropped_and_resized():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # the central square is white, the sides black
    fitted = fit_frames(frames, 16, 16)  # 2:1 -> 1:1 keeps columns 20..60 only
    assert fitted.shape == (2, 16, 16, 3) and fitted.min() > 200  # (Lanczos reads a pixel past the cut)
    wide = fit_frames(frames, 8, 32)  # 2:1 -> 4:1 cuts rows, keeps every column
    assert wide.shape == (2, 8, 32, 3) and wide[:, :, 0].max() < 30 and wide[:, :, 16].min() > 200
    assert fit_frames(frames, 40, 80) is frames
