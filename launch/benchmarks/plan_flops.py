"""Steady-state FLOPs per block of any plan, counted on a stand-in network.

What a forward costs depends on the model and on its shape in frames (query frames and key
frames: RunStats.calls), and the shapes depend on the plan alone: the steps, the offset, the
window, the segments. So the preset's plan, sampling and stream geometry run on the CPU with a
2-layer random network of the same family at 64x64 make the same calls as the real run, and the
real model's analytic FLOPs of those calls (engine/models/flops.py) are the real run's. A
sequential plan is counted in closed form (timing.steady_block_flops); the pyramid (MAGI-1) and
SkyReels-V2's segments by the stand-in:
* pyramid: with n blocks in flight, blocks n..2n-1 of 3n finish while the pipeline is full;
* segments: the first segment is the fill; each later one adds (segment - overlap) new blocks,
  the first of them dearer (it runs the whole segment's start), so the mean over later segments.
"""

from __future__ import annotations

import dataclasses
import statistics
from functools import cache

import torch

from engine.config import Preset
from engine.families import family_of
from engine.weight_paths import WeightPaths
from launch.benchmarks.timing import calls_flops, steady_block_flops
from launch.build import build_session
from launch.presets import TINY_TEXT, TINY_VAE, get_preset
from launch.throughput import blocks_in_flight


def stand_in(preset: Preset) -> Preset:
    """The preset's plan, sampling and stream frames with a 2-layer random network at 64x64."""
    family = family_of(preset.model)
    keeps = {switch: getattr(preset.model, switch) for switch in family.stand_in_keeps}
    model = dataclasses.replace(get_preset(family.tiny_preset).model, **keeps)
    return dataclasses.replace(
        preset, name=f"{preset.name} (stand-in)", model=model, vae=TINY_VAE, random_init=True,
        text=dataclasses.replace(TINY_TEXT, special_tokens=preset.text.special_tokens),
        stream=dataclasses.replace(preset.stream, height=64, width=64),
    )  # fmt: skip


def counted_block_flops(preset: Preset, blocks: int) -> list[int]:
    """FLOPs of the real preset's forwards that finished each of `blocks` blocks, in order."""
    session = build_session(stand_in(preset), WeightPaths(random=True), torch.device("cpu"), torch.float32)
    run = session.run("a red circle moving left", blocks=blocks, seed=0)
    counted, before = [], None
    with torch.no_grad():
        for _ in run:
            calls = run.stats.calls
            counted.append(calls_flops(preset, calls, before))
            before = calls.copy()
    return counted


@cache
def steady_flops(name: str) -> float:
    """FLOPs per block of the preset's steady state."""
    preset = get_preset(name)
    plan, frames = preset.plan, preset.stream.frames_per_block
    if plan.schedule == "sequential":
        return float(steady_block_flops(preset))
    if plan.schedule == "skyreels":
        first, new = plan.segment_frames // frames, (plan.segment_frames - plan.overlap_frames) // frames
        return statistics.fmean(counted_block_flops(preset, first + 2 * new)[first:])
    n = blocks_in_flight(preset, plan.offset)
    return statistics.median(counted_block_flops(preset, 3 * n)[n : 2 * n])
