"""Generate a video to an MP4 file, on one process or as a cascade over torchrun ranks.

    python -m engine.generate --prompt "a red circle moving left" --blocks 8 --out x.mp4
    python -m engine.generate --preset self-forcing-1.3b --checkpoint self_forcing_dmd.pt \\
        --base Wan2.1-T2V-1.3B-Diffusers --prompt "..." --blocks 7 --out video.mp4
    torchrun --nproc_per_node=3 -m engine.generate --schedule cascade --offset 1 --context joint --out x.mp4
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.config import Preset
from engine.loading import build_decoder, resolve_dtype
from engine.models.vae import to_uint8
from engine.runtime.session import Pipeline
from engine.serving.video import Mp4Writer
from launch.cli import (
    USER_ERRORS,
    add_parallel_arguments,
    add_plan_arguments,
    add_preset_arguments,
    add_weight_arguments,
    parallel_from_args,
    preset_from_args,
    rank_device,
    weights_from_args,
)
from parallel.cascade import decode_rank_plan
from parallel.runtime import RankFailure, launched
from parallel.topology import Topology, TopologyError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    add_preset_arguments(parser)
    parser.add_argument("--prompt", default="a red circle moving left", help="text prompt")
    parser.add_argument(
        "--blocks", type=int, help="blocks to generate (default: about 5 seconds of video at the preset's fps)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the whole video")
    parser.add_argument("--out", type=Path, default=Path("out.mp4"), help="output MP4 path")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets loaded")
    add_weight_arguments(parser)
    add_plan_arguments(parser)
    add_parallel_arguments(parser)
    args = parser.parse_args(argv)
    if args.blocks is not None and args.blocks < 1:
        parser.error("--blocks must be >= 1")
    return args


def _frames(
    args: argparse.Namespace, preset: Preset, topology: Topology
) -> tuple[Iterator[np.ndarray], Pipeline | None]:
    """Decoded frames of each block, in order, on the rank that writes (nothing on the others),
    and the pipeline on compute ranks."""
    device = rank_device(args, topology)
    weights = weights_from_args(args)
    if topology.is_compute:
        pipeline = Pipeline.build(preset, weights, device, resolve_dtype(args.dtype, device), topology)
        return (frames for _, frames in pipeline.generate(args.prompt, blocks=args.blocks, seed=args.seed)), pipeline
    decoder = build_decoder(preset, weights, device)  # a dedicated decode rank
    blocks = decode_rank_plan(preset, topology, args.blocks)
    return (to_uint8(decoder.decode(block.latents)) for block in blocks), None


def default_blocks(preset: Preset, seconds: float = 5.0) -> int:
    """Blocks that make about `seconds` of video (at least 2)."""
    frames_per_block = preset.pixel_frames(2) - preset.pixel_frames(1)  # after the first block
    return max(2, round(seconds * preset.stream.fps / frames_per_block))


def run(args: argparse.Namespace, topology: Topology) -> dict | None:
    preset = preset_from_args(args)
    args.blocks = args.blocks or default_blocks(preset)
    if topology.distributed and preset.plan.schedule != "cascade":
        raise TopologyError(f"{topology.world_size} processes need --schedule cascade (got {preset.plan.schedule})")
    start = time.perf_counter()
    blocks, pipeline = _frames(args, preset, topology)
    if not topology.is_decoder:
        for _ in blocks:  # compute ranks without output just run their share
            pass
        return None
    stream, first_frame_s = preset.stream, None
    with Mp4Writer(args.out, fps=stream.fps, width=stream.width, height=stream.height) as writer:
        progress = tqdm(total=args.blocks, unit="block", disable=None, file=sys.stderr)
        for frames in blocks:
            first_frame_s = first_frame_s or time.perf_counter() - start
            writer.write(frames)
            progress.update(1)
        progress.close()
    seconds = time.perf_counter() - start
    frames_written = writer.frames_written
    return {
        "frames": frames_written,
        "seconds": seconds,
        "fps": frames_written / seconds,
        "first_frame_s": first_frame_s,
        "cache": _cache_summary(pipeline),
    }


def _cache_summary(pipeline: Pipeline | None) -> dict | None:
    stats = getattr(pipeline.executors[-1], "cache_stats", None) if pipeline and pipeline.executors else None
    return None if stats is None else stats.summary()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with launched(parallel_from_args(args)) as topology:
            stats = run(args, topology)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RankFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if stats is not None:
        print(
            f"wrote {args.out}: {stats['frames']} frames in {stats['seconds']:.2f} s "
            f"({stats['fps']:.1f} FPS, first frame after {stats['first_frame_s']:.2f} s)"
        )
        if stats["cache"]:
            print("cache: " + ", ".join(f"{k} {v}" for k, v in stats["cache"].items()))
    return 0


def entry() -> int:
    """The `-m` entry point: no autograd anywhere in a run."""
    torch.set_grad_enabled(False)
    return main()


if __name__ == "__main__":
    sys.exit(entry())
