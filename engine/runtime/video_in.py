"""Video in (video-to-video): the input part of a stream, which starts blocks from input frames.

As each block may start, `VideoIn.schedule_for(b)` takes the block's frames from the source (a
`FrameFeed`, engine/media/feed.py, or any iterator of uint8 `[H, W, 3]` frames), encodes them with
the family's encoder and answers the strength schedule (engine/plan/steps.py's `from_strength`).
`initial(b)` is then the block's starting latents, x = (1 - S) x0 + S noise(b, 0): the input
noised to the strength, denoised under the prompt with the block-causal KV cache like any block.
Once the source has ended, blocks take the full schedule from pure noise: the stream goes on from
its prompt (text-to-video), seen through the K/V of the blocks before.

Rules:
* a source is read once per block, in block order; each block's frames are taken when the plan
  first asks about it (the moment the engine could start it), so a live source's freshest frames
  are used and the older ones have been dropped by the feed;
* a live feed that has fewer frames than a block after `wait_s` gives what it has, the last frame
  repeated (a stalled camera holds its picture); a feed with none repeats the previous block's,
  and before its first frames the blocks run from the prompt alone (`wait_s` None: wait for them);
* a strength at or above the schedule's first sigma starts there (the full schedule); where that
  sigma is 1 (every explicit-timestep preset) the starting latents are 0 x0 + 1 noise, exactly
  the stream's noise, so the output is the text-to-video one bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from engine.media import fit_frames
from engine.plan.sigmas import Schedule
from engine.plan.steps import from_strength
from engine.sampling.noise import NoiseSource

Encoder = Callable[[np.ndarray], torch.Tensor]
"""uint8 frames `[F, H, W, 3]` of the stream's size -> normalised latents `[1, C, f, h, w]`."""


class FrameSource:
    """Blocks of frames from a feed (`take` with a wait, `finished`) or a plain iterator (pulled)."""

    def __init__(self, source, wait_s: float | None):
        self.feed = source if hasattr(source, "take") else None
        self._frames: Iterator | None = None if self.feed else iter(source)
        self.wait_s = wait_s
        self.ended = False
        self._last: np.ndarray | None = None  # the previous block's frames, for a stalled feed

    def block(self, count: int) -> np.ndarray | None:
        """`[count, H, W, 3]` uint8; None when there is no picture (the source ended, or a live
        feed has not sent its first frames within `wait_s`)."""
        if self.ended:
            return None
        if self.feed is None:
            frames = self._pull(count)
        else:
            frames = self.feed.take(count, self.wait_s)
            if not frames and not self.feed.finished():
                return self._last  # a live feed with nothing new: hold the picture
        if not frames:
            self.ended = True
            return None
        frames = list(frames) + [frames[-1]] * (count - len(frames))  # a short block: hold the last
        self._last = np.stack(frames)
        return self._last

    def _pull(self, count: int) -> list[np.ndarray]:
        frames = []
        for frame in self._frames:
            frames.append(np.asarray(frame))
            if len(frames) == count:
                break
        return frames


class VideoIn:
    """One stream's input: which schedule each block takes and the latents it starts from."""

    def __init__(
        self,
        source: Iterable,
        encoder: Encoder,
        schedule: Schedule,
        strength: float,
        noise: NoiseSource,
        *,
        pixel_frames: Callable[[int], int],
        size: tuple[int, int],
        wait_s: float | None = None,
    ):
        """`pixel_frames(b)`: input frames block b takes (the family's temporal stride decides);
        `size`: (height, width) the encoder takes (frames of another size are center-cropped to
        its aspect ratio and resized, as a given start's are)."""
        self.frames = FrameSource(source, wait_s)
        self.encoder, self.noise, self.size = encoder, noise, size
        self.strong = from_strength(schedule, strength)
        self.strength = min(strength, schedule.sigmas[0])
        self.pixel_frames = pixel_frames
        self.latents: dict[int, torch.Tensor] = {}  # encoded input of started blocks, until used
        self._chosen: dict[int, Schedule | None] = {}
        self.blocks_in = 0  # blocks that started from input frames

    @property
    def ended(self) -> bool:
        return self.frames.ended

    def schedule_for(self, block: int) -> Schedule | None:
        """Block `block`'s schedule, None for no input (the plan's own, from noise); its frames are
        taken and encoded the first time it is asked."""
        if block not in self._chosen:
            frames = self.frames.block(self.pixel_frames(block))
            if frames is None:
                self._chosen[block] = None
            else:
                with torch.no_grad():
                    self.latents[block] = self.encoder(fit_frames(frames, *self.size))
                self._chosen[block] = self.strong
                self.blocks_in += 1
            self._chosen.pop(block - 2, None)  # the plan asks only about the block that waits
        return self._chosen[block]

    def stats(self) -> dict:
        """Blocks started from input, whether it ended, and a feed's counts (pushed, dropped)."""
        feed = self.frames.feed
        counts = feed.stats() if hasattr(feed, "stats") else {}
        return {"blocks_in": self.blocks_in, "ended": self.ended, **counts}

    def initial(self, block: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Block `block`'s starting latents `shape` = [B, C, F, h, w]: the stream's noise for
        (block, 0), mixed with the block's encoded input at the strength when it has one."""
        noise = self.noise.noise(shape, block, 0, device)
        latents = self.latents.pop(block, None)
        if latents is None:
            return noise
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"the encoder gave latents {list(latents.shape)} for a block of {list(shape)}")
        s = self.strength
        return (1.0 - s) * latents.to(device, torch.float32) + s * noise


class InputSlot:
    """Where a running stream takes video in, plugged in or out between blocks (a server's
    session: a camera that arrives after the session opened). Empty, blocks take the plan's own
    schedule and the stream's noise, exactly as without a slot."""

    def __init__(self, executor):
        self.executor = executor
        self.video: VideoIn | None = None

    def schedule_for(self, block: int) -> Schedule | None:
        return None if self.video is None else self.video.schedule_for(block)

    def initial(self, block: int) -> torch.Tensor:
        ex = self.executor
        if self.video is None:
            return ex.noise.noise(ex.block_shape, block, 0, ex.device)
        return self.video.initial(block, ex.block_shape, ex.device)
