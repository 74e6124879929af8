"""Generate a video to an MP4 file.

    python -m engine.generate --preset tiny-wan --prompt "a red circle" --blocks 3 --seed 0 --out x.mp4
    python -m engine.generate --preset self-forcing-1.3b --checkpoint self_forcing_dmd.pt \\
        --base Wan2.1-T2V-1.3B-Diffusers --prompt "..." --blocks 7 --out video.mp4
    python -m engine.generate --preset skyreels-v2-df-tiny --schedule pyramid --offset 1 --blocks 6
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.build import SetupError, resolve_device, resolve_dtype
from engine.config import ConfigError
from engine.models.checkpoints import CheckpointError
from engine.pipeline import Pipeline
from engine.video import Mp4Writer
from launch.cli import (
    add_plan_arguments,
    add_preset_arguments,
    add_weight_arguments,
    preset_from_args,
    weights_from_args,
)

DEFAULT_PRESET = "tiny-wan"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    add_preset_arguments(parser, DEFAULT_PRESET)
    parser.add_argument("--prompt", default="a red circle moving left", help="text prompt")
    parser.add_argument(
        "--blocks", type=int, default=4, help="blocks to generate (each is frames_per_block latent frames)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the whole video")
    parser.add_argument("--out", type=Path, default=Path("out.mp4"), help="output MP4 path")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets loaded")
    add_weight_arguments(parser)
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    preset = preset_from_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipeline = Pipeline.build(preset, weights_from_args(args), device, dtype)
    stream = preset.stream
    start = time.perf_counter()
    first_frame_s = None
    blocks = pipeline.generate(args.prompt, blocks=args.blocks, seed=args.seed)
    with Mp4Writer(args.out, fps=stream.fps, width=stream.width, height=stream.height) as writer:
        progress = tqdm(total=args.blocks, unit="block", disable=None, file=sys.stderr)
        for _, frames in blocks:
            first_frame_s = first_frame_s or time.perf_counter() - start
            writer.write(frames)
            progress.update(1)
        progress.close()
        frames_written = writer.frames_written
    seconds = time.perf_counter() - start
    return {
        "frames": frames_written,
        "seconds": seconds,
        "fps": frames_written / seconds,
        "first_frame_s": first_frame_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        stats = run(args)
    except (SetupError, CheckpointError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {stats['frames']} frames in {stats['seconds']:.2f} s "
        f"({stats['fps']:.1f} FPS, first frame after {stats['first_frame_s']:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
