"""Config validation and presets.

pytest tests/launch/test_config.py
"""

import dataclasses

import pytest

from engine.config import ConfigError, SamplingConfig, StreamConfig, WanConfig
from launch.presets import PRESETS, get_preset, main, parameter_count


def test_every_preset_builds_and_is_frozen():
    for name in PRESETS:
        preset = get_preset(name)
        assert preset.name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            preset.stream.window_frames = 1


def test_unknown_preset_lists_the_choices():
    with pytest.raises(KeyError, match="tiny-wan"):
        get_preset("self-forcing-13b")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: WanConfig(dim=100, ffn_dim=64, num_heads=3, num_layers=2), "not divisible"),
        (lambda: WanConfig(dim=64, ffn_dim=64, num_heads=2, num_layers=2, patch_size=(2, 2, 2)), "temporal patch"),
        (lambda: StreamConfig(frames_per_block=3, window_frames=5, sink_frames=3), "must hold a block"),
        (lambda: SamplingConfig(timesteps=(500.0, 750.0)), "decrease"),
        (lambda: SamplingConfig(timesteps=(1200.0,)), r"\(0, 1000\]"),
        (
            lambda: dataclasses.replace(
                get_preset("tiny-wan"), stream=StreamConfig(height=60, width=64, window_frames=9)
            ),
            "divisible",
        ),
    ],
)
def test_invalid_configs_fail_clearly(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_geometry_of_the_real_presets():
    preset = get_preset("self-forcing-1.3b")
    assert preset.latent_hw == (60, 104) and preset.tokens_per_frame == 1560
    assert preset.stream.context_frames == 18 and preset.stream.ring_frames == 18
    assert preset.pixel_frames(7) == 81  # 21 latent frames -> Self-Forcing's 81-frame videos
    longlive = get_preset("longlive-1.3b").stream
    assert (longlive.sink_frames, longlive.ring_frames) == (3, 6)


def test_parameter_counts_match_published_sizes():
    assert 1.3e9 < parameter_count(get_preset("self-forcing-1.3b")) < 1.5e9  # Wan2.1-T2V-1.3B: 1.42B
    assert 13.5e9 < parameter_count(get_preset("wan-14b-causal")) < 15e9  # Wan2.1-T2V-14B: 14.3B


def test_counts_command_prints_the_table(capsys):
    main(["--counts", "self-forcing-1.3b", "wan-14b-causal"])
    out = capsys.readouterr().out
    assert "1,418,996,800" in out and "14,288,491,584" in out
