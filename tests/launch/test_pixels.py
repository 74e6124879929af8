"""Streams that start from pixels: an image or a clip encoded by the family's VAE and committed as
the stream's first blocks (API, CLI, the demo's codec, Wan's VAE).

pytest tests/launch/test_pixels.py
"""

import numpy as np
import pytest
import torch

from engine.demo.pixels import PatchDecoder
from engine.media import MediaError, fit_frames
from engine.serving.video import Mp4Writer, read_frames
from helpers import assert_close
from launch.generate import main
from launch.pipeline import StreamingPipeline


def moving_square(frames: int = 12, size: int = 64) -> np.ndarray:
    video = np.full((frames, size, size, 3), 20, np.uint8)
    for i in range(frames):
        video[i, 24:40, 4 + 3 * i : 20 + 3 * i] = (220, 40, 40)
    return video


@pytest.fixture(scope="module")
def demo():
    return StreamingPipeline.from_preset("demo")


@pytest.fixture(scope="module")
def tiny():
    return StreamingPipeline.from_preset("tiny-wan").set_plan(schedule="sequential")


def test_demo_clip_becomes_the_codecs_blocks_and_continues_deterministically(demo, tmp_path):
    clip = moving_square()
    with Mp4Writer(tmp_path / "clip.mp4", fps=16, width=64, height=64) as writer:
        writer.write(clip)
    session = demo.session
    start = session.encode_start(read_frames(tmp_path / "clip.mp4"))
    keep = session.start_capacity()  # latent frames the window can see: 6 (two blocks)
    assert isinstance(session.decoder, PatchDecoder) and start.shape == (1, 16, keep, 16, 16)
    expected = session.decoder.codec.encode(read_frames(tmp_path / "clip.mp4")[-keep:])
    assert torch.equal(start, expected), "the committed start is the codec's encoding of the clip's end"
    video = demo.generate("a red square moving right", blocks=2, seed=3, video=tmp_path / "clip.mp4")
    again = demo.generate("a red square moving right", blocks=2, seed=3, video=tmp_path / "clip.mp4")
    fresh = demo.generate("a red square moving right", blocks=2, seed=3)
    assert video.frames.shape == (6, 64, 64, 3), "only new frames by default"
    assert np.array_equal(video.frames, again.frames), "the continuation is deterministic"
    assert not np.array_equal(video.frames, fresh.frames), "the start changes what follows"
    both = demo.generate("a red square moving right", blocks=2, seed=3, video=tmp_path / "clip.mp4", include_start=True)
    assert both.frames.shape[0] == keep + 6 and np.array_equal(both.frames[keep:], video.frames)
    assert np.abs(both.frames[:keep].astype(int) - clip[-keep:]).mean() < 10, "the start decodes back"


def test_a_stream_continued_from_its_own_blocks_goes_on_as_it_did(tiny):
    """Sequential plan: a stream's first two blocks given as the start make its later blocks again,
    so a given start sits in the KV cache exactly as the stream's own commits do (sink included)."""
    session = tiny.session
    made = [b.latents for b in session.run("a red circle", blocks=4, seed=5)]
    start = torch.cat(made[:2], dim=2)
    continued = [b for b in session.run("a red circle", blocks=2, seed=5, start=start)]
    assert [b.index for b in continued] == [2, 3]
    for block, expected in zip(continued, made[2:]):
        assert_close(block.latents, expected, 1e-4, f"block {block.index} after a given start")
    with pytest.raises(ValueError, match="whole 3-frame blocks"):
        session.run("a red circle", blocks=1, seed=5, start=start[:, :, :4])


def test_wan_image_start_is_the_images_own_first_latent(tiny):
    session = tiny.session
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # 5:3, cropped to 1:1
    start = session.encode_start(image[None])
    assert start.shape == (1, 4, 3, 8, 8), "an image is held still for one block"
    alone = session.decoder.encode(fit_frames(image[None], 64, 64))  # the causal VAE's first latent frame
    assert alone.shape[2] == 1
    assert_close(start[:, :, :1], alone, 1e-5, "first latent frame = the image's own")
    video = tiny.generate("a red circle", blocks=1, seed=0, image=image)
    assert video.frames.shape == (tiny.preset.pixel_frames(2) - tiny.preset.pixel_frames(1), 64, 64, 3)
    with pytest.raises(MediaError, match="not both"):
        tiny.generate("a red circle", blocks=1, image=image, video=image[None])


def test_cli_continues_a_clip_and_refuses_bad_files_in_one_line(tmp_path, capsys):
    with Mp4Writer(tmp_path / "clip.mp4", fps=16, width=64, height=64) as writer:
        writer.write(moving_square())
    out = tmp_path / "more.mp4"
    assert main(["--video", str(tmp_path / "clip.mp4"), "--blocks", "2", "--out", str(out)]) == 0
    assert read_frames(out).shape == (6, 64, 64, 3)
    capsys.readouterr()
    (tmp_path / "notes.png").write_text("not a picture")
    assert main(["--image", str(tmp_path / "notes.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "not an image or video" in err[-1] and len(err) == 1
