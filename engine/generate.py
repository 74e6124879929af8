"""Generate a video to an MP4 file.

    python -m engine.generate --preset tiny-wan --prompt "a red circle" --blocks 3 --seed 0 --out x.mp4
    python -m engine.generate --preset self-forcing-1.3b --checkpoint self_forcing_dmd.pt \\
        --base Wan2.1-T2V-1.3B-Diffusers --prompt "..." --blocks 7 --out video.mp4
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.models.checkpoints import CheckpointError
from engine.pipeline import Pipeline, SetupError, WeightPaths, resolve_device, resolve_dtype
from engine.video import Mp4Writer
from launch.presets import PRESETS, get_preset

DEFAULT_PRESET = "tiny-wan"


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weights")
    group.add_argument("--checkpoint", type=Path, help="transformer weights: diffusers folder, Wan .safetensors/.pth, Self-Forcing .pt")
    group.add_argument("--base", type=Path, help="Wan2.1 diffusers folder with text_encoder/, tokenizer/, vae/")
    group.add_argument("--text-encoder", type=Path, help="umT5 transformers folder (overrides --base)")
    group.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the text encoder)")
    group.add_argument("--vae", type=Path, help="VAE: diffusers folder or Wan2.1_VAE.pth (overrides --base)")
    group.add_argument("--lora", type=Path, help="LoRA adapter merged into the transformer (LongLive's lora.pt)")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    group.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                       help="Self-Forcing .pt: use generator_ema (default when present) or generator")
    group.add_argument("--random-weights", action="store_true", help="seeded random weights for every part")


def weight_paths(args: argparse.Namespace) -> WeightPaths:
    return WeightPaths(
        checkpoint=args.checkpoint,
        base=args.base,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
        vae=args.vae,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        ema=args.ema,
        random=args.random_weights,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"model preset (default {DEFAULT_PRESET})")
    parser.add_argument("--prompt", default="a red circle moving left", help="text prompt")
    parser.add_argument("--blocks", type=int, default=4, help="blocks to generate (each is frames_per_block latent frames)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the whole video")
    parser.add_argument("--out", type=Path, default=Path("out.mp4"), help="output MP4 path")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets loaded")
    add_weight_arguments(parser)
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    preset = get_preset(args.preset)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipeline = Pipeline.build(preset, weight_paths(args), device, dtype)
    stream = preset.stream
    start = time.perf_counter()
    first_frame_s = None
    with Mp4Writer(args.out, fps=stream.fps, width=stream.width, height=stream.height) as writer:
        progress = tqdm(total=args.blocks, unit="block", disable=None, file=sys.stderr)
        for _, frames in pipeline.generate(args.prompt, blocks=args.blocks, seed=args.seed):
            first_frame_s = first_frame_s or time.perf_counter() - start
            writer.write(frames)
            progress.update(1)
        progress.close()
        frames_written = writer.frames_written
    seconds = time.perf_counter() - start
    return {"frames": frames_written, "seconds": seconds, "fps": frames_written / seconds, "first_frame_s": first_frame_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        stats = run(args)
    except (SetupError, CheckpointError, OSError) as err:
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
