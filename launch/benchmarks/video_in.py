"""Video-to-video against text-to-video on one model: time to first frame and FPS, same run.

Each repeat runs, back to back on the same loaded session, one text-to-video stream and one
video-to-video stream per strength (`--strengths`), every stream `--blocks` blocks long with the
same prompt and seed. The input is the demo's clip of a red circle moving right (already decoded,
so the numbers are the engine's: encode + denoise + decode), under "a blue circle moving right".
Reported per mode, as the median over `--repeats` (the machine is shared; the order of the modes
rotates each repeat, so a burst of load does not land on one mode only):

* `ttff_s`: from the call to the first block's decoded frames (the first block's input encoded);
* `fps`: frames over the stream's wall-clock seconds; `cpu_fps`: over its CPU seconds (steadier
  under other processes' load); `vs_t2v`: fps over the text-to-video fps of the same repeat;
* `steps_per_block` / `forwards_per_block`: the strength's denoising steps (+1: the commit);
* `encode_ms_per_block`: the family's encoder (the demo's codec here) per input block.

A live source adds what this leaves out: a feed cannot hand over frames faster than its camera
records them, so a v2v stream's FPS is at most the camera's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from engine.demo import scenes
from engine.devices import resolve_device
from engine.plan.steps import from_strength
from launch.benchmarks.common import session_for
from launch.presets import get_preset

COLUMNS = ["mode", "strength", "steps_per_block", "forwards_per_block", "ttff_s", "fps", "cpu_fps", "vs_t2v",
           "encode_ms_per_block"]  # fmt: skip
PROMPT = "a blue circle moving right"
INPUT = "a red circle moving right"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="a preset with an encoder and a per-step solver")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per stream")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.6, 0.8, 1.0], help="v2v strengths")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every mode (the median is reported)")
    parser.add_argument("--seed", type=int, default=0, help="every stream's seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


class TimedEncoder:
    """Wraps a stream's encoder: seconds and calls."""

    def __init__(self, encoder):
        self.encoder, self.seconds, self.calls = encoder, 0.0, 0

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        start = time.perf_counter()
        latents = self.encoder(frames)
        self.seconds, self.calls = self.seconds + time.perf_counter() - start, self.calls + 1
        return latents


def _stream(session, blocks: int, seed: int, clip: np.ndarray | None, strength: float | None) -> dict:
    """One stream, timed: ttff, fps (wall and CPU), encode time per block."""
    video = {} if clip is None else {"video_in": iter(clip), "strength": strength}
    wall, cpu, first, frames = time.perf_counter(), time.process_time(), None, 0
    run = session.run(PROMPT, blocks=blocks, seed=seed, **video)
    encoder = getattr(run, "video_in", None) and run.video_in.encoder
    for _, pixels in run.frames():
        first = first or time.perf_counter() - wall
        frames += len(pixels)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    encode_ms = 1000 * encoder.seconds / max(encoder.calls, 1) if encoder else None
    return {"ttff_s": first, "fps": frames / seconds, "cpu_fps": frames / cpu_seconds, "encode_ms_per_block": encode_ms}


def _timed_encoders(session) -> None:
    """Every video-in stream of `session` gets its encoder wrapped in a TimedEncoder."""
    make = session.encoders
    session.encoders = lambda: TimedEncoder(make())


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    preset = get_preset(args.preset)
    session = session_for(preset, device)
    _timed_encoders(session)
    frames = args.blocks * preset.stream.frames_per_block
    clip = scenes.make_clip(np.random.default_rng(1), frames=frames, description=scenes.parse_prompt(INPUT)).frames
    modes = [("t2v", None)] + [("v2v", s) for s in args.strengths]
    _stream(session, 1, args.seed, clip, modes[-1][1])  # warm up allocators and kernels
    results: dict[tuple, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
        for mode in order:
            results[mode].append(_stream(session, args.blocks, args.seed, None if mode[1] is None else clip, mode[1]))
        t2v_fps = results[modes[0]][-1]["fps"]
        for mode in modes:
            results[mode][-1]["vs_t2v"] = results[mode][-1]["fps"] / t2v_fps
    rows = [_row(session, mode, runs) for mode, runs in results.items()]
    settings = {k: getattr(args, k) for k in ("preset", "blocks", "strengths", "repeats", "seed")}
    settings.update(device=str(device), torch_threads=torch.get_num_threads(), cores=os.cpu_count(),
                    load_average=os.getloadavg(), prompt=PROMPT, input=INPUT)  # fmt: skip
    print(f"torch threads {settings['torch_threads']}, {settings['cores']} cores, load average "
          f"{settings['load_average'][0]:.2f}; medians of {args.repeats} repeats")  # fmt: skip
    return rows, COLUMNS, settings


def _row(session, mode: tuple, runs: list[dict]) -> dict:
    name, strength = mode
    steps = (session.schedule if strength is None else from_strength(session.schedule, strength)).steps
    median = {k: statistics.median(r[k] for r in runs) for k in ("ttff_s", "fps", "cpu_fps", "vs_t2v")}
    encode = [r["encode_ms_per_block"] for r in runs if r["encode_ms_per_block"] is not None]
    return {"mode": name, "strength": strength, "steps_per_block": steps, "forwards_per_block": steps + 1, **median,
            "encode_ms_per_block": statistics.median(encode) if encode else None}  # fmt: skip
