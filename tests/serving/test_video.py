"""MP4 writing: colour conversion, round trip through the decoder, bad input.

pytest tests/serving/test_video.py
"""

import numpy as np
import pytest

from engine.serving.video import Mp4Writer, read_frames, rgb_to_yuv420p


@pytest.mark.parametrize(
    "rgb, yuv",
    [
        ((255, 255, 255), (235, 128, 128)),
        ((0, 0, 0), (16, 128, 128)),
        ((255, 0, 0), (81, 90, 240)),
        ((0, 0, 255), (41, 240, 110)),
    ],
)
def test_bt601_limited_range(rgb, yuv):
    frame = np.full((4, 4, 3), rgb, dtype=np.uint8)
    planes = rgb_to_yuv420p(frame).ravel()
    assert (planes[0], planes[16], planes[20]) == yuv  # Y of pixel 0, then U and V of block 0


def test_round_trip_is_faithful(tmp_path):
    """Encode smooth coloured frames and decode them with FFmpeg: colours must come back (PSNR > 30 dB)."""
    y, x = np.mgrid[0:64, 0:96]
    frames = np.stack(
        [np.stack([(x * 2 + t * 8) % 256, (y * 3) % 256, np.full_like(x, 40 + 20 * t)], axis=-1) for t in range(6)]
    ).astype(np.uint8)
    path = tmp_path / "clip.mp4"
    with Mp4Writer(path, fps=16, width=96, height=64) as writer:
        writer.write(frames[:2])
        writer.write(frames[2:])
    decoded = read_frames(path)
    assert decoded.shape == frames.shape and writer.frames_written == 6
    mse = np.mean((decoded.astype(np.float64) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30, f"PSNR {10 * np.log10(255**2 / mse):.1f} dB"


def test_bad_sizes_and_frames(tmp_path):
    with pytest.raises(ValueError, match="even sizes"):
        Mp4Writer(tmp_path / "odd.mp4", fps=16, width=63, height=64)
    with Mp4Writer(tmp_path / "ok.mp4", fps=16, width=64, height=64) as writer:
        with pytest.raises(ValueError, match="expected uint8 frames"):
            writer.write(np.zeros((2, 32, 64, 3), dtype=np.uint8))


def test_encoder_failure_is_reported(tmp_path):
    """An output the encoder cannot open fails loudly at close(), and write() never blocks on it."""
    directory = tmp_path / "is_a_directory.mp4"
    directory.mkdir()
    writer = Mp4Writer(directory, fps=16, width=64, height=64, max_pending=1)
    with pytest.raises(RuntimeError, match="is_a_directory.mp4"):
        for _ in range(4):  # more batches than max_pending: the failed thread must keep draining
            writer.write(np.zeros((1, 64, 64, 3), dtype=np.uint8))
        writer.close()
