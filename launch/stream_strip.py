"""Draw frames of one long demo stream per set of weights: a row per weights, a column per second.

python -m launch.stream_strip --weights out/demo-stage3 engine/weights/demo --seconds 0 10 30 60 \
    --out engine/weights/demo/long-stream.png

The model card's picture is made this way ("a red circle moving left", seed 0, upscaled 3x).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.argparsing import OneLineParser
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.cli import USER_ERRORS
from launch.presets import get_preset

GAP = 4  # pixels between frames, after upscaling


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m launch.stream_strip",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--weights", type=Path, nargs="+", required=True, help="weight folders, one row each")
    parser.add_argument("--prompt", default="a red circle moving left", help="the stream's prompt")
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed")
    parser.add_argument("--seconds", type=float, nargs="+", default=[0, 10, 30, 60], help="where the columns are")
    parser.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling")
    parser.add_argument("--out", type=Path, default=Path("out/long-stream.png"), help="the PNG to write")
    return parser.parse_args(argv)


def stream_row(folder: Path, prompt: str, seed: int, seconds: list[float]) -> list[np.ndarray]:
    """The frames `[H, W, 3]` uint8 at each of `seconds` of one stream made with the weights in `folder`."""
    preset = get_preset("demo")
    fps, block = preset.stream.fps, preset.stream.frames_per_block
    wanted = [round(s * fps) for s in seconds]
    session = build_session(preset, WeightPaths.bundle(folder), torch.device("cpu"), torch.float32)
    run = session.run(prompt, blocks=max(wanted) // block + 1, seed=seed)
    frames = np.concatenate([f for _, f in run.frames()])  # [N, H, W, 3] uint8
    return [frames[i] for i in wanted]


def strip(rows: list[list[np.ndarray]], scale: int) -> Image.Image:
    tiles = [[np.kron(f, np.ones((scale, scale, 1), np.uint8)) for f in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    columns = len(tiles[0])
    canvas = np.full((len(tiles) * (h + GAP) - GAP, columns * (w + GAP) - GAP, 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[r * (h + GAP) : r * (h + GAP) + h, c * (w + GAP) : c * (w + GAP) + w] = tile
    return Image.fromarray(canvas)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = [stream_row(folder, args.prompt, args.seed, args.seconds) for folder in args.weights]
    except USER_ERRORS as err:  # a wrong folder or a malformed file is one line, as in generate
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip(rows, args.scale).save(args.out)
    print(f"wrote {args.out}: {len(rows)} rows x {len(args.seconds)} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
