"""Prompt adherence of the demo model: color, shape and motion read back from generated video.

A fixed set of prompts (cycling through every color, shape and motion) is generated under each
plan; `engine.eval.adherence` reads the frames. Prompt switches: videos whose prompt changes at a
block boundary, measured in blocks until the video matches the new prompt.

With `--horizons 0-8 50-60 300-320` each prompt makes one long video instead, read per stretch
of blocks (`engine.eval.horizons`): adherence, the share of frames showing an object, and the
background's brightness and its drift from the first `--baseline-seconds` of the same video.

With `--continuation N` the model continues N clips of the generator's own scenes instead: each
clip's first blocks (`--clip-blocks`), encoded by the demo's codec, are the stream's clean
committed context (the executor's pre-ready prefix), and the next `--blocks` blocks are read for
the clip's color, shape and motion. Every table also gives `split`: the share of frames showing a
second copy of the object (`engine.eval.objects`). `--timesteps` replaces the preset's sampling
steps, to measure another sampler on the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import SOLVERS
from engine.demo.scenes import COLORS, MOTIONS, SHAPES, Description, make_clip
from engine.devices import resolve_device
from engine.eval.adherence import adherence, blocks_to_follow
from engine.eval.horizons import background_brightness, horizon_scores, parse_horizon, summarize
from engine.eval.objects import split_share
from engine.models.vae import to_uint8
from engine.plan.timeline import blocks_per_tick, pyramid
from engine.runtime.session import Session
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from launch.benchmarks.common import generate_video, session_for
from launch.presets import get_preset

COLUMNS = ["plan", "videos", "color", "shape", "motion", "all_three", "split", "fps"]
COLUMNS += ["switches", "within_2", "followed", "blocks_to_follow"]
HORIZON_COLUMNS = ["plan", "horizon", "videos", "color", "shape", "motion", "all_three", "split", "present"]
HORIZON_COLUMNS += ["brightness", "drift", "abs_drift", "fps"]
CONTINUATION_COLUMNS = ["plan", "clips", "clip_blocks", "blocks", "color", "shape", "motion", "all_three", "split"]


def eval_prompts(count: int) -> list[Description]:
    """`count` descriptions cycling colors, shapes and motions (36 covers each at least 4 times)."""
    colors, shapes, motions = list(COLORS), list(SHAPES), list(MOTIONS)
    return [
        Description(colors[i % len(colors)], shapes[i % len(shapes)], motions[i % len(motions)]) for i in range(count)
    ]


def switch_pairs(count: int) -> list[tuple[Description, Description]]:
    prompts = eval_prompts(count + 7)
    return [(prompts[i], prompts[i + 7]) for i in range(count)]  # changes all three attributes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="model preset")
    parser.add_argument(
        "--prompts", type=int, default=36, help="videos per plan (each color, shape and motion in turn)"
    )
    parser.add_argument("--blocks", type=int, default=8, help="blocks per video (without --horizons)")
    parser.add_argument("--plans", nargs="+", default=["sequential", "pyramid:1"], help="sequential or pyramid:OFFSET")
    parser.add_argument("--switches", type=int, default=12, help="prompt-switch videos per plan")
    parser.add_argument("--switch-block", type=int, default=4, help="block at which the prompt switches")
    parser.add_argument("--seed", type=int, default=0, help="first video's seed")
    parser.add_argument(
        "--weights", type=Path, default=None, help="a folder from launch.train_demo (none: the shipped weights)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument(
        "--horizons", nargs="+", default=None, help="block ranges FIRST-END of one video per prompt, e.g. 0-8 50-60"
    )
    parser.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="drift is measured from this start of each video"
    )
    parser.add_argument(
        "--continuation", type=int, default=0, help="continue this many clips of the generator's scenes instead (0: no)"
    )
    parser.add_argument("--clip-blocks", type=int, default=2, help="blocks of each clip given as context")
    parser.add_argument(
        "--timesteps", type=float, nargs="+", default=None, help="sampling steps (0-1000) instead of the preset's"
    )
    parser.add_argument("--solver", choices=SOLVERS, default=None, help="the per-block solver instead of the preset's")


def _session(args, plan: str, device) -> Session:
    preset = get_preset(args.preset)
    schedule, _, offset = plan.partition(":")
    plan_cfg = dataclasses.replace(preset.plan, schedule=schedule, offset=int(offset) if offset else None)
    preset = dataclasses.replace(preset, plan=plan_cfg)
    sampling = {"timesteps": tuple(args.timesteps)} if args.timesteps else {}
    sampling |= {"solver": args.solver} if args.solver else {}
    preset = dataclasses.replace(preset, sampling=dataclasses.replace(preset.sampling, **sampling))
    paths = WeightPaths() if args.weights is None else WeightPaths.bundle(args.weights)
    return session_for(preset, device, paths)


def _video(session: Session, prompt, blocks: int, seed: int) -> np.ndarray:
    return generate_video(session, prompt, blocks, seed)[0]


def _switch_video(session: Session, before: str, after: str, switch_block: int, blocks: int, seed: int) -> np.ndarray:
    """The prompt changes for every block starting at `switch_block` (at the first tick with such a block)."""
    started = {"switched": False}

    def prompt(tick) -> str:
        started["switched"] |= any(w.block >= switch_block and not w.commit for w in tick.work)
        return after if started["switched"] else before

    return generate_video(session, prompt, blocks, seed)[0]


def _evaluate_plan(args, plan: str, device) -> dict:
    session = _session(args, plan, device)
    frames_per_block = session.preset.stream.frames_per_block
    scores, splits, frames, seconds = [], [], 0, 0.0
    for i, desc in enumerate(eval_prompts(args.prompts)):
        start = time.perf_counter()
        video = _video(session, desc.prompt, args.blocks, args.seed + i)
        seconds += time.perf_counter() - start  # generation and decode, one stream at a time
        scores.append(adherence(video, desc))
        splits.append(split_share(video, desc.color))
        frames += len(video)
    delays = []
    for i, (before, after) in enumerate(switch_pairs(args.switches)):
        video = _switch_video(session, before.prompt, after.prompt, args.switch_block, args.blocks, args.seed + i)
        delays.append(blocks_to_follow(video, after, args.switch_block * frames_per_block, frames_per_block))
    followed = [d for d in delays if d is not None]
    return {
        "plan": plan,
        "videos": len(scores),
        "color": float(np.mean([s["color"] for s in scores])),
        "shape": float(np.mean([s["shape"] for s in scores])),
        "motion": float(np.mean([s["motion"] for s in scores])),
        "all_three": float(np.mean([all(s.values()) for s in scores])),
        "split": float(np.mean(splits)),
        "switches": len(delays),
        "within_2": sum(d <= 2 for d in followed) / max(len(delays), 1),
        "followed": len(followed) / max(len(delays), 1),
        "blocks_to_follow": float(np.mean(followed)) if followed else float("nan"),
        "fps": frames / seconds,
        "per_video": scores,
    }


def _evaluate_horizons(args, plan: str, device) -> list[dict]:
    """One video per prompt, as long as the last horizon; one row per horizon."""
    session = _session(args, plan, device)
    stream = session.preset.stream
    horizons = [parse_horizon(h) for h in args.horizons]
    baseline_frames = max(1, round(args.baseline_seconds * stream.fps))
    scores, frames, seconds = {h: [] for h in horizons}, 0, 0.0
    for i, desc in enumerate(eval_prompts(args.prompts)):
        start = time.perf_counter()
        video = _video(session, desc.prompt, max(end for _, end in horizons), args.seed + i)
        seconds += time.perf_counter() - start
        frames += len(video)
        baseline = float(background_brightness(video[:baseline_frames]).mean())
        for first, end in horizons:
            stretch = video[first * stream.frames_per_block : end * stream.frames_per_block]
            scores[(first, end)].append({**horizon_scores(stretch, desc, baseline),
                                         "split": split_share(stretch, desc.color)})  # fmt: skip
    return [
        {"plan": plan, "horizon": f"{first}-{end}", "videos": len(per_video), **summarize(per_video),
         "split": float(np.mean([v["split"] for v in per_video])), "fps": frames / seconds, "per_video": per_video}
        for (first, end), per_video in scores.items()
    ]  # fmt: skip


def _continue_clip(session: Session, clip: np.ndarray, prompt: str, blocks: int, seed: int) -> np.ndarray:
    """Frames of the `blocks` blocks that follow `clip` `[F, H, W, 3]` uint8 (whole blocks), whose
    latents are the stream's clean committed first blocks; the plan is the session's."""
    stream, plan, schedule = session.preset.stream, session.preset.plan, session.schedule
    block = stream.frames_per_block
    latents = session.decoder.codec.encode(clip[None])  # [1, C, F, h, w]
    given = len(clip) // block
    prefix = {b: latents[:, :, b * block : (b + 1) * block] for b in range(given)}
    offset = schedule.steps + 1 if plan.schedule == "sequential" else plan.offset  # tick 0 commits the clip too
    total = given + blocks
    executor = session.executors(NoiseSource(seed), blocks_in_forward=blocks_per_tick(schedule, offset, total, given))
    ticks = pyramid(schedule, offset=offset, num_blocks=total,
                    window_blocks=stream.window_frames // block, pre_ready=given)  # fmt: skip
    out = [
        b.latents for b in executor.run(ticks, session.prompts.conditioning(prompt), prefix=prefix) if b.index >= given
    ]
    return to_uint8(session.decoder.decode(torch.cat(out, dim=2)))


def _evaluate_continuation(args, plan: str, device) -> dict:
    """`--continuation` clips of the generator's scenes (anywhere in view, every description in
    turn), each continued for `--blocks` blocks and read for its color, shape and motion."""
    session = _session(args, plan, device)
    block, size = session.preset.stream.frames_per_block, session.preset.stream.height
    scores, splits = [], []
    for i, desc in enumerate(eval_prompts(args.continuation)):
        clip = make_clip(np.random.default_rng(args.seed + i), frames=args.clip_blocks * block, size=size,
                         block_frames=block, description=desc)  # fmt: skip
        video = _continue_clip(session, clip.frames, desc.prompt, args.blocks, args.seed + i)
        scores.append(adherence(video, desc))
        splits.append(split_share(video, desc.color))
    return {
        "plan": plan, "clips": len(scores), "clip_blocks": args.clip_blocks, "blocks": args.blocks,
        **{k: float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "motion")},
        "all_three": float(np.mean([all(s.values()) for s in scores])),
        "split": float(np.mean(splits)), "per_video": scores,
    }  # fmt: skip


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.continuation:
        rows = [_evaluate_continuation(args, plan, device) for plan in args.plans]
        settings = {k: getattr(args, k) for k in ("preset", "continuation", "clip_blocks", "blocks", "seed")}
        settings["weights"] = "shipped" if args.weights is None else args.weights.as_posix()
        settings["timesteps"], settings["solver"] = args.timesteps, args.solver
        return rows, CONTINUATION_COLUMNS, settings
    if args.horizons:
        rows = [row for plan in args.plans for row in _evaluate_horizons(args, plan, device)]
        settings = {k: getattr(args, k) for k in ("preset", "prompts", "horizons", "baseline_seconds", "seed")}
        settings["weights"] = "shipped" if args.weights is None else args.weights.as_posix()
        settings["timesteps"], settings["solver"] = args.timesteps, args.solver
        return rows, HORIZON_COLUMNS, settings
    rows = [_evaluate_plan(args, plan, device) for plan in args.plans]
    settings = {k: getattr(args, k) for k in ("preset", "prompts", "blocks", "switches", "switch_block", "seed")}
    settings["weights"] = "shipped" if args.weights is None else args.weights.as_posix()
    settings["timesteps"], settings["solver"] = args.timesteps, args.solver
    return rows, COLUMNS, settings
