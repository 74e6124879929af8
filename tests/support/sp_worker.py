"""Ranks of a sequence-parallel test run (launched by tests under torchrun, never collected).

    torchrun --standalone --nproc_per_node=4 tests/support/sp_worker.py --out DIR --cases wan12:2:pyramid:1:torch

Each case PRESET:SP:SCHEDULE:OFFSET:BACKEND[:CACHE:THRESHOLD] shards every forward over the first
SP ranks of the job with Ulysses (one launch runs several degrees: start-up is the slow part);
the other ranks wait for the next case. Rank 0 saves the whole video's latents and the bytes of
its KV cache to DIR/<case>.pt.

The presets are tiny models with heads that 2, 3 and 4 divide, at 80x80 (25 tokens a frame), so
that a forward's tokens (25 x frames) mostly do not divide sp: slices are padded and cut across
frames. `wan12-f2` has 2-frame blocks, so that sp 3 cuts across frames too (with 3-frame
blocks sp 3 splits at frame boundaries).
"""

import argparse
import dataclasses
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import CacheConfig
from engine.runtime.sharding import Ulysses
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.presets import get_preset
from parallel.ulysses import GroupExchange

SIZE = dict(height=80, width=80)  # 10 x 10 latents, 5 x 5 = 25 tokens a frame
WAN_12_HEADS = dict(dim=96, num_heads=12)  # head_dim 8
MAGI_12_HEADS = dict(dim=192, num_heads=12, kv_heads=6, rope_bands=2)  # GQA, head_dim 16


def _wan(frames_per_block: int):
    preset = get_preset("tiny-wan")
    stream = dataclasses.replace(preset.stream, **SIZE, frames_per_block=frames_per_block,
                                 window_frames=3 * frames_per_block, sink_frames=frames_per_block)  # fmt: skip
    return dataclasses.replace(preset, model=dataclasses.replace(preset.model, **WAN_12_HEADS), stream=stream)


def _magi():
    preset = get_preset("magi-1-tiny")
    stream = dataclasses.replace(preset.stream, **SIZE)
    return dataclasses.replace(preset, model=dataclasses.replace(preset.model, **MAGI_12_HEADS), stream=stream)


PRESETS = {"wan12": lambda: _wan(3), "wan12-f2": lambda: _wan(2), "magi12": _magi}


def case_preset(case: str):
    """The preset of a case PRESET:SP:SCHEDULE:OFFSET:BACKEND[:CACHE:THRESHOLD] (also the tests' reference)."""
    name, _, schedule, offset, _, *cache = case.split(":")
    preset = PRESETS[name]()
    plan = dataclasses.replace(preset.plan, schedule=schedule, offset=None if schedule == "sequential" else int(offset))
    policy = CacheConfig(policy=cache[0], threshold=float(cache[1])) if cache else CacheConfig()
    return dataclasses.replace(preset, plan=plan, cache=policy)


def run_case(case: str, group, blocks: int, out: Path) -> None:
    sp, backend = int(case.split(":")[1]), case.split(":")[4]
    preset = case_preset(case)
    sharding = Ulysses(GroupExchange(group, backend))
    assert sharding.size == sp
    session = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32, sharding=sharding)
    latents = torch.cat([b.latents for b in session.run("a red circle", blocks=blocks, seed=0)], dim=2)
    kv_bytes = session.executors(NoiseSource(0), blocks_in_forward=1).cache.nbytes
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"latents": latents, "kv_bytes": kv_bytes}, out / f"{case.replace(':', '-')}.pt")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    try:
        for case in args.cases:
            sp = int(case.split(":")[1])
            group = dist.new_group(list(range(sp)))  # every rank creates every group, in the same order
            if dist.get_rank() < sp:
                run_case(case, group, args.blocks, args.out)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
