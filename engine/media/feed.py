"""A live source of input frames for video-to-video: a bounded queue that drops its oldest frame.

A camera or a clip reader pushes frames (uint8 `[H, W, 3]`) from its own thread; the engine takes
them a block at a time. The queue never grows past `capacity`: a frame pushed into a full queue
pushes the oldest one out and counts it in `dropped`, so a source faster than the engine costs
freshness, never memory. `close()` ends the input: what is queued is still handed out, then
`take` returns an empty list and iteration stops, which the stream reads as "go on from the
prompt alone".

Rules: `push` and `close` may be called from any thread; `take` and iteration belong to the one
consumer (the engine). Frames are kept as given (no copy, no resize): the family's encoder
resizes them to the model's size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

import numpy as np


class FeedError(ValueError):
    """A frame that is not uint8 `[H, W, 3]`: the source's bug, refused at `push`."""


def checked_frame(frame) -> np.ndarray:
    """The frame as a uint8 `[H, W, 3]` array (numpy or torch in), or FeedError in one line."""
    array = frame.numpy() if hasattr(frame, "numpy") else np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise FeedError(f"a video-in frame must be uint8 [H, W, 3], got {array.dtype} {list(array.shape)}")
    return array


class FrameFeed:
    """A bounded, thread-safe, drop-oldest queue of input frames with an end."""

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"FrameFeed capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.pushed = 0  # frames the source gave
        self.dropped = 0  # of those, frames pushed out unread by newer ones
        self._frames: deque[np.ndarray] = deque()
        self._closed = False
        self._ready = threading.Condition()

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, frame) -> bool:
        """Queue one frame; False (and nothing queued) once the feed is closed."""
        array = checked_frame(frame)
        with self._ready:
            if self._closed:
                return False
            if len(self._frames) == self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(array)
            self.pushed += 1
            self._ready.notify_all()
        return True

    def close(self) -> None:
        """End the input: queued frames are still taken, then the feed reads as finished."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take(self, count: int, timeout: float | None = None) -> list[np.ndarray]:
        """Up to `count` frames, oldest first, waiting until `count` are queued or the feed closes.

        Fewer than `count` come back only when the feed closed (its last frames) or `timeout`
        seconds passed; an empty list after close means the input has ended. A `count` above the
        capacity waits for a full queue.
        """
        need = min(count, self.capacity)
        with self._ready:
            self._ready.wait_for(lambda: self._closed or len(self._frames) >= need, timeout)
            return [self._frames.popleft() for _ in range(min(count, len(self._frames)))]

    def finished(self) -> bool:
        """Closed and drained: nothing more will come."""
        with self._ready:
            return self._closed and not self._frames

    def __len__(self) -> int:
        with self._ready:
            return len(self._frames)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Frames one by one until the feed is closed and drained."""
        while frames := self.take(1):
            yield frames[0]

    def stats(self) -> dict[str, int]:
        return {"pushed": self.pushed, "dropped": self.dropped, "queued": len(self)}
