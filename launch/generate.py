"""Generate a video to an MP4 file, on one process, or over torchrun ranks (cascade and/or sp).

    python -m engine.generate --prompt "a red circle moving left" --blocks 8 --out x.mp4
    python -m engine.generate --video clip.mp4 --blocks 8 --out more.mp4   # continue a clip
    python -m engine.generate --image first.png --blocks 8 --out moving.mp4  # start from an image
    python -m engine.generate --preset self-forcing-1.3b --checkpoint self_forcing_dmd.pt \\
        --base Wan2.1-T2V-1.3B-Diffusers --prompt "..." --blocks 7 --out video.mp4
    torchrun --nproc_per_node=3 -m engine.generate --schedule cascade --offset 1 --context joint --out x.mp4
    torchrun --nproc_per_node=2 -m engine.generate --sp 2 --out x.mp4     # the preset's plan, 2 ranks per forward
    python -m engine.generate --video-in clip.mp4 --strength 0.6 --prompt "a blue circle moving right"
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.argparsing import OneLineParser
from engine.config import Preset
from engine.devices import resolve_dtype
from engine.media.frames import ClipError, clip_frames
from engine.models.vae import to_uint8
from engine.serving import flags
from engine.serving.video import Mp4Writer
from launch import cli
from launch.pipeline import given_frames
from launch.run import RankRun, on_ranks
from parallel.topology import Topology, TopologyError

DEFAULT_STRENGTH = 0.6
"""Video in's default noise level: on the demo the prompt's color wins and the input's layout
and motion stay (docs/video-in.md)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    cli.add_preset_arguments(parser)
    parser.add_argument("--prompt", type=flags.prompt, default="a red circle moving left",
                        help="text prompt, as a stream's viewers may send (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--blocks", type=int, help="blocks to generate (default: about 5 seconds of video at the preset's fps)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the whole video (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out.mp4"), help="output MP4 path (default: %(default)s)")
    parser.add_argument("--strength", type=float, help="with --video-in: noise level in (0, 1] each input block "
                        f"starts from; 1 ignores the input (default: {DEFAULT_STRENGTH})")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets loaded (default: off)")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--image", type=Path, help="start from this image (PNG, JPEG, WebP, GIF, BMP; center-cropped "
                       "and resized to the preset's size) (default: from noise)")  # fmt: skip
    given.add_argument("--video", type=Path, help="continue this clip (MP4, MOV, WebM, MKV, AVI): its last frames "
                       "become the stream's first blocks (default: from noise)")  # fmt: skip
    given.add_argument("--video-in", type=Path, help="video-to-video: each block starts from this clip's next "
                       "frames (then from the prompt once it ends) (default: none, text-to-video)")  # fmt: skip
    parser.add_argument("--include-start", action="store_true", help="also write the given image or clip's end, as "
                        "the VAE gives it back, before the new frames (default: off, only new frames)")  # fmt: skip
    cli.add_run_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.blocks is not None and args.blocks < 1:
        parser.error("--blocks must be >= 1")
    if args.include_start and args.image is None and args.video is None:
        parser.error("--include-start needs --image or --video")
    if args.strength is not None and args.video_in is None:
        parser.error("--strength goes with --video-in (the noise level input blocks start from)")
    args.strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    if not 0.0 < args.strength <= 1.0:
        parser.error(f"--strength must lie in (0, 1], got {args.strength}")
    if args.video_in is not None:
        try:
            args.clip = clip_frames(args.video_in)
        except ClipError as err:
            parser.error(str(err))
    return args


def default_blocks(preset: Preset, seconds: float = 5.0) -> int:
    """Blocks that make about `seconds` of video (at least 2)."""
    frames_per_block = preset.pixel_frames(2) - preset.pixel_frames(1)  # after the first block
    return max(2, round(seconds * preset.stream.fps / frames_per_block))


def run(args: argparse.Namespace, topology: Topology) -> dict | None:
    preset = cli.preset_from_args(args)
    args.blocks = args.blocks or default_blocks(preset)
    for note in cli.single_process_notes(args, topology):
        print(f"note: {note}", file=sys.stderr)
    device = cli.rank_device(args, topology)
    start = time.perf_counter()
    threads = cli.process_from_args(args).get("threads")
    dtype = resolve_dtype(args.dtype, device)
    given = given_frames(args.image, args.video)  # checked before the model loads
    if given is not None and topology.distributed:
        raise TopologyError("--image and --video run on one process for now: run without torchrun")
    rank = RankRun(preset, cli.weights_from_args(args), device, dtype, topology, threads, cli.speed_from_args(args))
    start_latents = None if given is None else rank.session.encode_start(given)
    v2v = {} if args.video_in is None else {"video_in": args.clip, "strength": args.strength}
    blocks = rank.blocks(args.prompt, blocks=args.blocks, seed=args.seed, start=start_latents, **v2v)
    if not topology.is_decoder:
        for _ in blocks:  # compute ranks without output just run their share
            pass
        return None
    stream, first_frame_s = preset.stream, None
    with Mp4Writer(args.out, fps=stream.fps, width=stream.width, height=stream.height) as writer:
        progress = tqdm(total=args.blocks, unit="block", disable=None, file=sys.stderr)
        rank.decoder.reset()
        if start_latents is not None:  # decoded first: a causal decoder goes on from the given frames
            given_back = to_uint8(rank.decoder.decode(start_latents))
            if args.include_start:
                writer.write(given_back)
        for block in blocks:
            frames = to_uint8(rank.decoder.decode(block.latents))
            first_frame_s = first_frame_s or time.perf_counter() - start
            writer.write(frames)
            progress.update(1)
        progress.close()
    seconds = time.perf_counter() - start
    stats = rank.stats()
    return {
        "frames": writer.frames_written,
        "seconds": seconds,
        "fps": writer.frames_written / seconds,
        "first_frame_s": first_frame_s,
        "cache": None if stats is None else stats.skip_summary(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    code, stats = on_ranks(args, lambda topology: run(args, topology))
    if code:
        return code
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
