"""The public Python API: build from a preset, generate, stream with a prompt change, switch
caching and plans with calls.

pytest tests/launch/test_api.py
"""

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from launch.pipeline import StreamingPipeline


@pytest.fixture(scope="module")
def pipe():
    return StreamingPipeline.from_preset("tiny-wan")


def test_generate_returns_frames_and_stats(pipe, tmp_path):
    video = pipe.generate("a red circle", blocks=3, seed=0)
    assert video.frames.dtype == np.uint8 and video.frames.shape[0] == pipe.preset.pixel_frames(3)
    assert video.stats.forwards == 3 * (pipe.preset.sampling.steps + 1) and video.stats.skip == {}
    assert video.save(tmp_path / "v.mp4").stat().st_size > 0
    again = pipe.generate("a red circle", blocks=3, seed=0)
    assert np.array_equal(video.frames, again.frames), "the same seed gives the same video"


def test_stream_takes_a_prompt_change_while_running(pipe):
    same = pipe.generate("a red circle", blocks=4, seed=1).frames
    stream = pipe.stream("a red circle", seed=1)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.index == 1:
            stream.set_prompt("a blue square")
        if chunk.index == 3:
            break
    frames = np.concatenate([c.frames for c in chunks])
    first_two = pipe.preset.pixel_frames(2)
    assert np.array_equal(frames[:first_two], same[:first_two]), "blocks before the change are untouched"
    assert not np.array_equal(frames[first_two:], same[first_two:]), "blocks after it follow the new prompt"
    assert chunks[-1].prompt == "a blue square" and stream.stats.ticks > 0


def test_cache_and_plan_switch_by_calls(pipe):
    plain = pipe.generate("a red circle", blocks=3, seed=0)
    pipe.enable_cache("teacache", threshold=0.0)
    assert pipe.preset.cache.policy == "teacache"
    cached = pipe.generate("a red circle", blocks=3, seed=0)
    assert np.array_equal(cached.frames, plain.frames) and cached.stats.hit_rate == 0.0
    pipe.disable_cache().set_plan(schedule="pyramid", offset=1, context="lagged")
    lagged = pipe.generate("a red circle", blocks=3, seed=0)
    assert lagged.stats.ticks < plain.stats.ticks, "blocks in flight share ticks"
    assert lagged.stats.forwards > lagged.stats.ticks, "lagged context runs one forward per block in flight"
    with pytest.raises(ConfigError, match="recache"):
        pipe.set_plan(switch="recache")  # a pyramid has blocks in flight at every tick
    pipe.set_plan(schedule="sequential", offset=None, context="joint")
    assert torch.equal(torch.from_numpy(pipe.generate("a red circle", blocks=3, seed=0).frames),
                       torch.from_numpy(plain.frames))  # fmt: skip


def test_the_api_takes_the_prompts_every_entry_point_takes(pipe):
    """One prompt rule for the commands and the API (engine/serving/protocol.py's clean_prompt)."""
    with pytest.raises(ValueError, match="prompt longer than 2000 bytes of UTF-8"):
        pipe.generate("a" * 3000, blocks=1)
    with pytest.raises(ValueError, match="non-empty"):
        pipe.stream("   ")
    stream = pipe.stream("a red circle moving left")
    with pytest.raises(ValueError, match="control characters"):
        stream.set_prompt("a blue\x00square")
    assert stream.prompt == "a red circle moving left"
