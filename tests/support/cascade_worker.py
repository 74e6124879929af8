"""One rank of a cascade test run (launched by tests under torchrun, never collected by pytest).

    torchrun --standalone --nproc_per_node=3 tests/support/cascade_worker.py --out DIR --runs joint:causal:1

For each run CONTEXT:ATTENTION:OFFSET[:CACHE:THRESHOLD] the sink rank saves the clean latents of the whole video to
DIR/<run with - for :>.pt (one launch, several runs: start-up is the slow part). `--fault
RANK:TICK:KIND` makes one rank fail at one tick (raise, exit, hang) through the per-tick prompt
function, which every rank calls.
"""

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch

from engine.config import CacheConfig
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.presets import get_preset
from parallel.runtime import RankFailure, launched
from parallel.topology import ParallelConfig


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-wan")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--runs", nargs="+", default=["joint:causal:1"], help="CONTEXT:ATTENTION:OFFSET")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--fault", default="")
    parser.add_argument("--sp", type=int, default=1, help="Ulysses ranks per cascade stage")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def prompt_for(args: argparse.Namespace, rank: int):
    fault_rank, fault_tick, kind = (args.fault.split(":") + ["", "", ""])[:3] if args.fault else ("-1", "-1", "")

    def prompt(tick) -> str:
        if rank == int(fault_rank) and tick.index == int(fault_tick):
            if kind == "raise":
                raise RuntimeError(f"injected failure at tick {tick.index}")
            if kind == "exit":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)
        return "a red circle moving left" if tick.index < 6 else "a blue square moving up"

    return prompt


def run_preset(name: str, run: str):
    """The preset of a run CONTEXT:ATTENTION:OFFSET[:CACHE:THRESHOLD] (also the tests' reference)."""
    context, attention, offset, *cache = run.split(":")
    preset = get_preset(name)  # keeps the preset's own plan settings (MAGI-1's KV ranges)
    plan = dataclasses.replace(
        preset.plan, schedule="cascade", offset=int(offset), context=context, attention=attention
    )
    policy = CacheConfig(policy=cache[0], threshold=float(cache[1])) if cache else CacheConfig()
    return dataclasses.replace(preset, plan=plan, cache=policy)


def main() -> int:
    args = parse()
    torch.set_grad_enabled(False)
    try:
        with launched(ParallelConfig(timeout_s=args.timeout, sp=args.sp)) as topology:
            for run in args.runs:
                preset = run_preset(args.preset, run)
                pipeline = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32, topology)
                blocks = list(pipeline.run(prompt_for(args, topology.rank), blocks=args.blocks, seed=args.seed))
                if topology.is_decoder:
                    args.out.mkdir(parents=True, exist_ok=True)
                    latents = torch.cat([b.latents for b in blocks], dim=2)
                    torch.save(latents, args.out / f"{run.replace(':', '-')}.pt")
    except RankFailure as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
