"""How big a stream's parts are, decided once for the builder and the memory plan alike.

The session builder (launch/build.py) and the memory plan (launch/memory.py) both size a stream
from these functions: the guidance (how many branches share a forward), the frames one forward
holds and the KV cache those imply. The plan calls them on the meta device before anything loads,
the builder on the real device; being the same calls, the plan cannot drift from what is built.
"""

from __future__ import annotations

import torch

from engine.config import Preset
from engine.families import family_of
from engine.loading import build_kv_cache, build_rope
from engine.plan.sigmas import Schedule
from engine.plan.timeline import blocks_per_tick, committed_blocks_needed
from engine.runtime.kv import KVCache
from engine.sampling.guidance import ClassifierFree, Guidance
from engine.sampling.magi_guidance import WINDOW as MAGI_WINDOW
from engine.sampling.magi_guidance import MagiGuidance


def make_guidance(preset: Preset, schedule: Schedule) -> Guidance:
    """The model family's guidance: classifier-free (Wan) or MAGI-1's."""
    sampling = preset.sampling
    if sampling.magi is None:
        return ClassifierFree(sampling.guidance_scale)
    reach = preset.plan.history_reach
    return MagiGuidance(sampling.magi, schedule, len(reach) if reach else MAGI_WINDOW, sampling.shortcut)


def ring_frames(preset: Preset, schedule: Schedule) -> int:
    """The stream's recent window, widened where per-block reaches (MAGI-1) need more history."""
    plan, stream = preset.plan, preset.stream
    if plan.history_reach is None:
        return stream.ring_frames
    offset = None if plan.schedule == "sequential" else plan.offset
    needed = committed_blocks_needed(plan.history_reach, plan.commit_reach, schedule.steps, offset)
    return max(stream.ring_frames, needed * stream.frames_per_block)


def forward_blocks(preset: Preset, blocks_in_forward: int) -> int:
    """Blocks one forward holds: a recache reruns the whole visible window in one forward."""
    if preset.plan.switch != "recache":
        return blocks_in_forward
    return max(blocks_in_forward, -(-preset.stream.context_frames // preset.stream.frames_per_block))


def endless_blocks_in_forward(preset: Preset, schedule: Schedule) -> int:
    """Blocks in an endless stream's largest forward (what a live stream and a session size for)."""
    plan, stream = preset.plan, preset.stream
    offset = None if plan.schedule == "sequential" else plan.offset
    if offset == 0:  # synchronous: a finite video, at most a window of blocks at once
        return forward_blocks(preset, stream.window_frames // stream.frames_per_block)
    return forward_blocks(preset, blocks_per_tick(schedule, offset, None))


def frames_in_forward(preset: Preset, schedule: Schedule) -> int:
    """Latent frames of one branch in the largest forward: the whole window where the plan reruns it."""
    plan, stream = preset.plan, preset.stream
    if plan.compute == "window":
        return plan.segment_frames or stream.window_frames
    return endless_blocks_in_forward(preset, schedule) * stream.frames_per_block


def stream_kv_cache(
    preset: Preset,
    schedule: Schedule,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    blocks_in_forward: int,
    ring: int | None = None,
    rope=None,
    head_shards: int = 1,
    storage: str = "model",
) -> KVCache:
    """One stream's KV cache as its executor holds it (on the meta device: measured, not allocated)."""
    guidance = make_guidance(preset, schedule)
    cache = build_kv_cache(
        preset, dtype, device, batch=guidance.branches,
        scratch_frames=blocks_in_forward * preset.stream.frames_per_block,
        ring_frames=ring_frames(preset, schedule) if ring is None else ring,
        rope=rope if rope is not None else build_rope(preset, "cpu"), head_shards=head_shards, storage=storage,
    )  # fmt: skip
    cache.commit_from = family_of(preset.model).kv_commit_from(guidance.branches)
    return cache
