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
