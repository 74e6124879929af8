"""SkyReels-V2 long videos: finite segments, each starting from the previous one's last latents.

SkyReels-V2 denoises a segment of `segment_frames` latent frames with its timestep matrix; a
longer video is made of segments whose first `overlap_frames` latents are the clean end of the
video so far (a pre-ready prefix, optionally re-noised by `addnoise_condition`). This follows
diffusers' `SkyReelsV2DiffusionForcingPipeline`, which does it in latent space:
* segment i >= 1 covers min(left + overlap, segment_frames) frames, left = frames still to make;
* its prefix is the last `overlap` latents, cut to a whole number of blocks (keeping the oldest);
* its frames from `overlap` on are new video.
Unlike diffusers, sizes that are not whole blocks are refused instead of silently dropping frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ConfigError


@dataclass(frozen=True)
class Segment:
    index: int
    first_frame: int
    """Absolute latent frame where the segment starts (its prefix included)."""
    frames: int
    prefix_frames: int
    """Clean frames at the start, copied from the video so far."""
    new_from: int
    """Frames of the segment before this one are not new video."""


def plan_segments(
    total_frames: int, segment_frames: int | None, overlap_frames: int, block_frames: int, given_frames: int = 0
) -> list[Segment]:
    """The segments of a `total_frames` video (latent frames), whose first `given_frames` are a
    given clip's encoded end (video-to-video: the first segment's clean prefix, as diffusers'
    `SkyReelsV2DiffusionForcingVideoToVideoPipeline` counts them in its `num_frames`)."""
    segment_frames = segment_frames or total_frames
    sizes = {"total": total_frames, "segment": segment_frames, "overlap": overlap_frames, "given": given_frames}
    for name, value in sizes.items():
        if value % block_frames:
            raise ConfigError(f"{name} latent frames ({value}) must be a whole number of {block_frames}-frame blocks")
    if not 0 <= given_frames < min(total_frames, segment_frames):
        raise ConfigError(f"a given start of {given_frames} latent frames leaves no new frame in its segment")
    if total_frames <= segment_frames:
        return [Segment(0, 0, total_frames, given_frames, given_frames)]
    if not 0 < overlap_frames < segment_frames:
        raise ConfigError(
            f"overlap ({overlap_frames}) must lie in (0, segment frames {segment_frames}) for long videos"
        )
    segments, done = [Segment(0, 0, segment_frames, given_frames, given_frames)], segment_frames
    while done < total_frames:
        frames = min(total_frames - done + overlap_frames, segment_frames)
        segments.append(Segment(len(segments), done - overlap_frames, frames, overlap_frames, overlap_frames))
        done += frames - overlap_frames
    return segments
