"""Pixels in: images and video clips read from a path or from bytes, checked before they are decoded.

May import: numpy, Pillow and PyAV (loaded only inside the functions that decode), and nothing of
arcade's. Main entry points: `load_media` (an image or a clip, told apart by content),
`load_image`, `load_video`, `fit_frames` (center-crop + resize to a stream's size), `MediaLimits`
and `MediaError` (every refusal: one line saying what is wrong and what to do). For video in
(video-to-video): `feed.FrameFeed` (a live source's bounded, drop-oldest queue of frames) and
`frames.clip_frames` (a clip read frame by frame, for streams that take it as it plays).

Rules of this package:
* the type comes from the content's magic bytes, never from a file name;
* sizes are checked before decoding: bytes first, then each frame's pixels from the header, then
  frames while decoding, so a hostile file never makes a large allocation;
* anything a decoder rejects is a `MediaError`, never a library's exception.
"""

from engine.media.decode import Media, load_image, load_media, load_video
from engine.media.fit import fit_frames
from engine.media.sniff import IMAGE_FORMATS, VIDEO_FORMATS, MediaError, MediaLimits, sniff

__all__ = [
    "IMAGE_FORMATS",
    "VIDEO_FORMATS",
    "Media",
    "MediaError",
    "MediaLimits",
    "fit_frames",
    "load_image",
    "load_media",
    "load_video",
    "sniff",
]
