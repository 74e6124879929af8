"""One rank of a sessions-on-a-group test (launched by tests/parallel/test_groups.py under torchrun).

    torchrun --standalone --nproc_per_node=2 tests/support/group_worker.py --out DIR --plan cascade:joint:1

Every rank builds the same session and manager (engine/serving/group.py); the group's leader
drives a fixed script of opens, a prompt switch, a suspend and a resume over a fake clock, and
saves each session's clean latents and prompt log to DIR/<scenario>.pt; the others follow. Two
scenarios run in one launch: `plain` and `suspended` (the same, with session b suspended and
resumed mid-stream), so the test can hold them bit-exact against each other and both against
one device.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from engine.config import CacheConfig  # noqa: E402
from engine.serving.group import Outbox, follow  # noqa: E402
from engine.serving.scheduler import Limits  # noqa: E402
from engine.serving.sessions import SessionManager  # noqa: E402
from engine.weight_paths import WeightPaths  # noqa: E402
from launch.build import build_session  # noqa: E402
from launch.presets import get_preset  # noqa: E402
from parallel.replicas import group_cast  # noqa: E402
from parallel.runtime import launched  # noqa: E402
from parallel.topology import ParallelConfig  # noqa: E402

RED, BLUE, GREEN = "a red circle moving left", "a blue square moving up", "a green triangle moving right"
ROUNDS = 24


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def group_preset(name: str, run: str):
    """The preset of a run SCHEDULE:CONTEXT:OFFSET[:CACHE:THRESHOLD] (also the tests' reference:
    on one process, the cascade schedule runs as the pyramid it is)."""
    schedule, context, offset, *cache = run.split(":")
    preset = get_preset(name)
    plan = dataclasses.replace(preset.plan, schedule=schedule, offset=int(offset), context=context)
    policy = CacheConfig(policy=cache[0], threshold=float(cache[1])) if cache else CacheConfig()
    return dataclasses.replace(preset, plan=plan, cache=policy)


def script(manager: SessionManager, clock: Clock, suspend: bool) -> dict:
    """Opens a at round 0, b at 3 and c at 5; switches a at round 7; with `suspend`, b's viewer
    leaves at round 9 (suspended at the next round: grace 0) and comes back at 13."""
    ids, out = {}, {}
    for round_index in range(ROUNDS):
        if round_index in (0, 3, 5):
            name = "abc"[(0, 3, 5).index(round_index)]
            ids[name] = manager.open((RED, BLUE, GREEN)[(0, 3, 5).index(round_index)], seed=11 + len(ids)).id
        if round_index == 7:
            manager.set_prompt(ids["a"], BLUE)
        if suspend and round_index == 9:
            manager.viewer_left(ids["b"])
        if suspend and round_index == 13:
            manager.viewer_returned(ids["b"])
        for sid, chunks in manager.round_blocks().items():
            out.setdefault(sid, []).extend(chunk.latents.cpu() for chunk in chunks)
        clock.t += 0.05
    return {
        name: {"latents": torch.cat(out[sid], dim=2), "prompts": list(manager.sessions[sid].prompt_log),
               "seed": manager.sessions[sid].seed}
        for name, sid in ids.items()
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="tiny-wan")
    parser.add_argument("--plan", default="cascade:joint:1")
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with launched(ParallelConfig(timeout_s=60, sp=args.sp, replicas=args.replicas)) as topology:
        cast = group_cast(topology)
        session = build_session(group_preset(args.preset, args.plan), WeightPaths(seed=3), torch.device("cpu"),
                                torch.float32, topology)  # fmt: skip
        for scenario in ("plain", "suspended"):
            clock = Clock()
            leading = topology.rank == topology.leader
            limits = Limits(kv_budget_bytes=256 << 20, degrade=False, grace_s=0.0, batch=4,
                            throughput_admission=False)  # fmt: skip
            manager = SessionManager(session, limits, clock, outbox=Outbox(cast) if leading else None)
            if not leading:
                follow(manager, cast)
                continue
            result = script(manager, clock, suspend=scenario == "suspended")
            manager.stop_group()
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(result, args.out / f"{scenario}-group{topology.group}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
