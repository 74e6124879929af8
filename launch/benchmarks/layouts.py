"""Sessions-server layouts on G GPUs, modelled: per-session FPS, first frame, sessions kept.

    python -m launch.bench layouts                     # self-forcing-1.3b and wan-14b-causal, 4 and 5 GPUs

For each preset and GPU count, every layout the launcher runs (K replicas of a cascade x sp group:
launch/layouts.py, on launch/throughput.py's model anchored on the published one-GPU FPS), with
the one `--parallel auto` picks marked. Beside them, the published multi-GPU anchors for one
stream: Block Cascading's 5-GPU figures and StreamDiffusionV2's 4xH100 one. Modelled, not measured:
nothing here runs a model.
"""

from __future__ import annotations

import argparse

from launch.layouts import choose_layout, rank_layouts
from launch.presets import get_preset
from launch.throughput import PUBLISHED_5_GPUS

COLUMNS = ["preset", "gpus", "layout", "sessions_at_fps", "session_fps", "first_frame_s", "picked", "anchor"]
STREAMDIFFUSION_V2 = {"wan-14b-causal": "StreamDiffusionV2: 58.3 FPS (14B, 4xH100, 1 step, 512x512)",
                      "self-forcing-1.3b": "StreamDiffusionV2: 64.5 FPS (1.3B, 4xH100, 1 step, 512x512)"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["self-forcing-1.3b", "wan-14b-causal"], help="presets")
    parser.add_argument("--gpus", nargs="+", type=int, default=[4, 5], help="GPU counts")
    parser.add_argument("--link", default="nvlink", choices=["nvlink", "pcie", "ib"], help="the GPUs' link")


def _anchor(preset: str, gpus: int) -> str:
    if gpus == 5 and preset in PUBLISHED_5_GPUS:
        return f"Block Cascading: {PUBLISHED_5_GPUS[preset]:g} FPS (one stream, 5 GPUs)"
    return STREAMDIFFUSION_V2.get(preset, "") if gpus == 4 else ""


def run(args: argparse.Namespace):
    rows = []
    for name in args.presets:
        preset = get_preset(name)
        for gpus in args.gpus:
            picked = choose_layout(preset, gpus, args.link, cascade=True, offset=1).layout
            for layout, time in rank_layouts(preset, gpus, args.link, cascade=True, offset=1):
                rows.append({"preset": name, "gpus": gpus, "layout": str(layout), "sessions_at_fps": time.sessions,
                             "session_fps": time.session_fps, "first_frame_s": time.first_frame_s,
                             "picked": "yes" if layout == picked else "", "anchor": _anchor(name, gpus)})  # fmt: skip
    settings = {"presets": args.presets, "gpus": args.gpus, "link": args.link, "modelled": True,
                "stream_fps": {n: get_preset(n).stream.fps for n in args.presets}}  # fmt: skip
    return rows, COLUMNS, settings
