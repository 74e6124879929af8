"""End to end: `python -m engine.generate` writes a playable MP4 of the right length, deterministically.

pytest tests/launch/test_generate.py
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.runtime.session import Session
from engine.serving.video import read_frames
from engine.weight_paths import WeightPaths
from helpers import write_diffusers_folder, write_self_forcing_pt, write_wan_safetensors
from launch.build import build_session
from launch.generate import main
from launch.presets import get_preset


def _generate(tmp_path, name, *extra):
    out = tmp_path / f"{name}.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--preset", "tiny-wan", "--blocks", "3", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, out


def test_cli_writes_the_preset_geometry_and_is_deterministic(tmp_path):
    preset = get_preset("tiny-wan")
    first, path_a = _generate(tmp_path, "a", "--seed", "0")
    assert first.returncode == 0, first.stderr
    assert "FPS" in first.stdout
    frames = read_frames(path_a)
    assert frames.shape == (preset.pixel_frames(3), preset.stream.height, preset.stream.width, 3)
    again, path_b = _generate(tmp_path, "b", "--seed", "0")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_frames(path_b), frames), "same seed, different video"
    other, path_c = _generate(tmp_path, "c", "--seed", "1")
    assert other.returncode == 0 and not np.array_equal(read_frames(path_c), frames)


def test_real_preset_without_weights_is_a_clear_error(tmp_path, capsys):
    assert main(["--preset", "self-forcing-1.3b", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "needs transformer weights" in err and "--checkpoint" in err


def test_bad_checkpoint_is_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "broken.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists(), "no output file for a run that never started"


def _frames(pipeline: Session, prompt: str, blocks: int, seed: int) -> np.ndarray:
    return np.concatenate([frames for _, frames in pipeline.run(prompt, blocks=blocks, seed=seed).frames()])


def test_three_checkpoint_formats_give_identical_videos(tmp_path):
    preset = get_preset("tiny-wan")
    source = build_session(preset, WeightPaths(seed=5), torch.device("cpu"), torch.float32)
    paths = [
        write_diffusers_folder(source.model, tmp_path / "diffusers", "40KB"),
        write_wan_safetensors(source.model, tmp_path / "wan.safetensors"),
        write_self_forcing_pt(source.model, tmp_path / "self_forcing.pt"),
    ]
    expected = _frames(source, "a red circle moving left", 3, seed=2)
    for path in paths:
        loaded = build_session(preset, WeightPaths(checkpoint=path, seed=5), torch.device("cpu"), torch.float32)
        assert np.array_equal(_frames(loaded, "a red circle moving left", 3, seed=2), expected), path.name


@pytest.mark.parametrize("prompt", ["a red circle moving left", "a blue square moving up"])
def test_pipeline_streams_blocks_in_order(prompt):
    pipeline = build_session(get_preset("tiny-wan"), WeightPaths(), torch.device("cpu"), torch.float32)
    blocks = [block for block, _ in pipeline.run(prompt, blocks=4, seed=0).frames()]
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    assert [b.first_frame for b in blocks] == [0, 3, 6, 9]


def test_cli_runs_skyreels_and_pyramid_plans(tmp_path, capsys):
    preset = get_preset("skyreels-v2-df-tiny")
    out = tmp_path / "sky.mp4"
    assert main(["--preset", "skyreels-v2-df-tiny", "--blocks", "6", "--out", str(out)]) == 0
    assert read_frames(out).shape[0] == preset.pixel_frames(6)
    out = tmp_path / "pyr.mp4"
    args = [
        "--preset",
        "skyreels-v2-df-tiny",
        "--schedule",
        "pyramid",
        "--offset",
        "1",
        "--compute",
        "selective",
        "--window-attention",
        "causal",
        "--steps",
        "3",
        "--blocks",
        "5",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert read_frames(out).shape[0] == preset.pixel_frames(5)


def test_cli_rejects_inconsistent_plans(tmp_path, capsys):
    assert main(["--schedule", "pyramid", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "needs an offset" in capsys.readouterr().err
    assert (
        main(
            [
                "--preset",
                "skyreels-v2-df-tiny",
                "--blocks",
                "5",
                "--segment-frames",
                "5",
                "--out",
                str(tmp_path / "y.mp4"),
            ]
        )
        == 2
    )
    assert "whole number" in capsys.readouterr().err
    assert (
        main(
            [
                "--preset",
                "skyreels-v2-df-tiny",
                "--blocks",
                "6",
                "--segment-frames",
                "4",
                "--overlap-frames",
                "4",
                "--out",
                str(tmp_path / "z.mp4"),
            ]
        )
        == 2
    )
    assert "overlap" in capsys.readouterr().err and not (tmp_path / "z.mp4").exists()
