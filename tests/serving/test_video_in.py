"""Video in: the frame feed (drop-oldest, counted, a clean end).

pytest tests/serving/test_video_in.py
"""

import threading

import numpy as np
import pytest

from engine.media.feed import FeedError, FrameFeed


def _frame(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, np.uint8)


def test_the_feed_drops_the_oldest_frames_counts_them_and_ends_cleanly():
    feed = FrameFeed(capacity=3)
    for value in range(5):
        assert feed.push(_frame(value))
    assert (feed.pushed, feed.dropped, len(feed)) == (5, 2, 3)
    assert [int(f[0, 0, 0]) for f in feed.take(2)] == [2, 3]  # 0 and 1 were pushed out
    with pytest.raises(FeedError, match="uint8"):
        feed.push(np.zeros((4, 6), np.uint8))
    # a producer thread closes the feed while the consumer waits for a full block
    producer = threading.Thread(target=lambda: (feed.push(_frame(9)), feed.close()))
    producer.start()
    assert [int(f[0, 0, 0]) for f in feed.take(3)] == [4, 9]
    producer.join()
    assert feed.take(3) == [] and feed.finished() and not feed.push(_frame(1))
    assert list(feed) == [] and feed.stats() == {"pushed": 6, "dropped": 2, "queued": 0}


@pytest.fixture(scope="module")
def pipe():
    from launch.pipeline import StreamingPipeline

    return StreamingPipeline.from_preset("demo")


def _offsets(video: np.ndarray, clip: np.ndarray) -> list[float]:
    """Per frame, how far (px, on the torus) the shape read from `video` is from the clip's."""
    from engine.eval.adherence import read_video

    pairs = [(a.center, b.center) for a, b in zip(read_video(video).frames, read_video(clip).frames)]
    return [np.abs((a - b + 32) % 64 - 32).max() for a, b in pairs if a is not None and b is not None]


def test_a_red_clip_under_a_blue_prompt_turns_blue_and_keeps_its_motion_then_the_prompt_goes_on(pipe):
    """Demo model: a red circle moving right in (starting off-centre), "a blue circle moving
    right" at strength 0.6 -> a blue circle that moves right where the input's circle is;
    strength 1 is the text-to-video stream bit for bit (its circle starts at the centre, away
    from the input's); once the clip ends the stream goes on from the prompt."""
    from engine.demo import scenes
    from engine.eval.adherence import read_video

    red = scenes.parse_prompt("a red circle moving right")
    clip = scenes.make_clip(np.random.default_rng(1), frames=18, description=red).frames
    prompt = "a blue circle moving right"
    out = pipe.generate(prompt, blocks=6, seed=0, video_in=iter(clip), strength=0.6).frames
    reading = read_video(out)
    assert (reading.color, reading.shape, reading.motion) == ("blue", "circle", "right"), reading
    offsets = _offsets(out, clip)
    assert len(offsets) >= 15 and np.median(offsets) < 4.0, f"the output strays from the input: {offsets}"

    t2v = pipe.generate(prompt, blocks=6, seed=0).frames
    full = pipe.generate(prompt, blocks=6, seed=0, video_in=iter(clip), strength=1.0).frames
    assert np.array_equal(full, t2v), f"strength 1 differs from text-to-video: {np.abs(full - t2v.astype(int)).max()}"
    assert np.median(_offsets(t2v, clip)) > 8.0, "the position check cannot tell input-following from not"

    stream = pipe.stream(prompt, seed=0, video_in=iter(clip[:6]), strength=0.6)
    chunks = [chunk.frames for chunk, _ in zip(stream, range(6))]
    assert stream.video_in.ended and stream.video_in.blocks_in == 2
    after = read_video(np.concatenate(chunks[2:]))
    assert (after.color, after.motion) == ("blue", "right"), after


def test_a_session_takes_a_live_feed_counts_what_it_drops_and_goes_on_after_it_ends(pipe):
    """A server session with a FrameFeed plugged in: the round never waits for it, frames pushed
    faster than blocks start are dropped oldest-first and counted, and after close() the session
    keeps streaming from its prompt."""
    from engine.demo import scenes
    from engine.serving.scheduler import Limits
    from engine.serving.sessions import SessionManager

    clock = iter(range(10**6))
    manager = SessionManager(pipe.session, Limits(kv_budget_bytes=64 << 20, degrade=False), lambda: next(clock))
    sid = manager.open("a blue circle moving right", seed=0).id
    feed = FrameFeed(capacity=4)
    assert manager.video_in(sid, feed, strength=0.6) == {"strength": 0.6}
    red = scenes.parse_prompt("a red circle moving right")
    for frame in scenes.make_clip(np.random.default_rng(1), frames=10, description=red).frames:
        feed.push(frame)
    blocks = []
    while len(blocks) < 3:
        blocks += manager.round().get(sid, [])
    assert manager.stats(sid)["video_in"] == {"blocks_in": 2, "ended": False, "pushed": 10, "dropped": 6, "queued": 0}
    feed.close()
    while len(blocks) < 5:
        blocks += manager.round().get(sid, [])
    assert manager.stats(sid)["video_in"]["ended"] and len(blocks) == 5 and blocks[4].shape == (3, 64, 64, 3)
