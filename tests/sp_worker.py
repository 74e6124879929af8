"""One rank of a sequence-parallel test run (launched by tests under torchrun, never collected).

    torchrun --standalone --nproc_per_node=2 tests/sp_worker.py --out DIR --runs pyramid:1:torch

Every rank of the job is one sp group (no cascade): each run SCHEDULE:OFFSET:BACKEND[:CACHE:THRESHOLD]
shards every forward over the ranks with Ulysses; rank 0 saves the whole video's latents and the
bytes of its KV cache to DIR/<run>.pt.
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

MAGI_SP = dict(dim=128, num_heads=4, kv_heads=2)  # MAGI-1 tiny with kv heads sp can divide


def run_preset(name: str, run: str):
    """The preset of a run SCHEDULE:OFFSET:BACKEND[:CACHE:THRESHOLD] (also the tests' reference)."""
    schedule, offset, _, *cache = run.split(":")
    preset = get_preset("magi-1-tiny" if name == "magi-sp" else name)
    if name == "magi-sp":
        preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, **MAGI_SP))
    plan = dataclasses.replace(preset.plan, schedule=schedule, offset=None if schedule == "sequential" else int(offset))
    policy = CacheConfig(policy=cache[0], threshold=float(cache[1])) if cache else CacheConfig()
    return dataclasses.replace(preset, plan=plan, cache=policy)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-wan")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        for run in args.runs:
            backend = run.split(":")[2]
            preset = run_preset(args.preset, run)
            sharding = Ulysses(GroupExchange(dist.group.WORLD, backend), preset.model.patch_size[1])
            session = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32, sharding=sharding)
            latents = torch.cat([b.latents for b in session.run("a red circle", blocks=args.blocks, seed=0)], dim=2)
            kv_bytes = session.executors(NoiseSource(0), blocks_in_forward=1).cache.nbytes
            if dist.get_rank() == 0:
                args.out.mkdir(parents=True, exist_ok=True)
                torch.save({"latents": latents, "kv_bytes": kv_bytes}, args.out / f"{run.replace(':', '-')}.pt")
        dist.barrier()  # leave together: a rank tearing gloo down while a peer still talks to it aborts
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
