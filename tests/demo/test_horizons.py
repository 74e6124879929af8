"""Long-horizon readings of demo videos: presence of the object, background brightness and drift.

pytest tests/demo/test_horizons.py
"""

import numpy as np
import pytest

from engine.demo.scenes import Description, all_descriptions, make_clip
from engine.eval.horizons import background_brightness, horizon_scores, parse_horizon, presence, summarize


def test_horizons_are_block_ranges():
    assert parse_horizon("0-8") == (0, 8)
    assert parse_horizon("300-320") == (300, 320)
    for bad in ("8", "8-8", "9-3", "a-b", "-4"):
        with pytest.raises(ValueError):
            parse_horizon(bad)


def test_the_generators_own_clips_read_present_and_steady():
    """Ground truth: the object is always there and the background never drifts."""
    rng = np.random.default_rng(5)
    scores = []
    for desc in all_descriptions()[::19]:
        clip = make_clip(rng, frames=72, description=desc)
        baseline = float(background_brightness(clip.frames[:48]).mean())
        scores.append(horizon_scores(clip.frames[48:], desc, baseline))
    summary = summarize(scores)
    assert summary["present"] == 1.0
    assert summary["abs_drift"] < 0.5, summary
    assert summary["color"] >= 0.95 and summary["motion"] >= 0.95, summary
    assert 5 < summary["brightness"] < 60, "the demo's backgrounds are dark"


def test_a_video_that_fades_to_grey_drifts_and_loses_its_object():
    desc = Description("red", "circle", "left")
    clip = make_clip(np.random.default_rng(1), frames=48, description=desc)
    fade = np.linspace(0.0, 1.0, 48)[:, None, None, None]
    grey = (clip.frames * (1 - fade) + 128 * fade).round().astype(np.uint8)
    baseline = float(background_brightness(grey[:12]).mean())
    late = horizon_scores(grey[-12:], desc, baseline)
    assert late["drift"] > 50
    assert late["present"] < 0.5 < presence(grey[:12])


def test_the_soak_summary_leaves_out_the_warmup():
    from launch.benchmarks.soak import summarize as soak_summary

    samples = ((10, 5.0, 30.0, 300), (40, 18.0, 40.0, 400), (70, 20.0, 40.0, 410))
    rows = [{"seconds": s, "fps": fps, "cpu_fps": cpu, "rss_mb": rss} for s, fps, cpu, rss in samples]
    summary = soak_summary(rows, warmup=30)
    assert summary["samples"] == 2 and summary["rss_growth_mb"] == 10
    assert abs(summary["fps_spread"] - 2 / 19) < 1e-9
    assert summary["cpu_fps_mean"] == 40.0 and summary["cpu_fps_spread"] == 0.0
    assert abs(summary["fps_change"] - 2 / 19) < 1e-9 and summary["cpu_fps_change"] == 0.0


def test_a_second_copy_of_the_object_is_a_split():
    """Ground truth shows one copy (a shape crossing an edge stays one blob on the torus); the
    same shape drawn twice is two copies; a blob of another color is not a copy."""
    from engine.demo.scenes import render
    from engine.eval.objects import copies, split_share

    desc = Description("yellow", "triangle", "up")
    clip = make_clip(np.random.default_rng(2), frames=12, description=desc)
    assert split_share(clip.frames, "yellow") == 0.0
    assert copies(render(desc, (32.0, 1.0), 9.0, 0, 64), "yellow") == 1, "wrapped over the top edge: one blob"
    one, other = render(desc, (16.0, 20.0), 9.0, 0, 64), render(desc, (48.0, 44.0), 9.0, 0, 64)
    twice = np.maximum(one, other)
    assert copies(twice, "yellow") == 2 and split_share(np.stack([twice, one]), "yellow") == 0.5
    cyan = render(Description("cyan", "circle", "up"), (48.0, 44.0), 9.0, 0, 64)
    assert copies(np.maximum(one, cyan), "yellow") == 1
