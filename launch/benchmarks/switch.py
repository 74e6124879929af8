"""Prompt-switch latency: from the switch message to the first frame made under the new prompt.

A stream runs on prompt A; from tick `--switch-tick` the requested prompt is B. Measured per plan:
* ticks and milliseconds until the first block whose last denoising step ran under B is out
  (the first frames B shaped), and until the first block denoised entirely under B;
* for the sequential plan with LongLive's recache, the new prompt waits for the next block and
  the recache forward (timed on its own) adds to the latency.
The cascade plans take B at the in-flight blocks' next step and need no recache. Times are this
machine's, one process (a cascade's ticks are shorter on several GPUs; see `cascade-model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from engine.devices import resolve_device
from engine.runtime.session import Session
from engine.sampling.noise import NoiseSource
from launch.benchmarks.common import session_for
from launch.presets import get_preset

COLUMNS = ["plan", "first_touched_ticks", "first_touched_ms", "first_full_ticks", "first_full_ms", "recache_ms"]
PLANS = {
    "sequential+recache": {"schedule": "sequential", "switch": "recache"},
    "sequential, no recache": {"schedule": "sequential"},
    "cascade offset 1": {"schedule": "cascade", "offset": 1},
    "cascade offset 2": {"schedule": "cascade", "offset": 2},
}
OLD, NEW = "a red circle moving left", "a blue square moving up"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="model preset")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per run")
    parser.add_argument("--switch-tick", type=int, default=12, help="tick at which the switch is requested")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


class _Switch:
    """The prompt per tick, and which steps of which blocks actually ran under the new one."""

    def __init__(self, switch_tick: int, waits_for_block: bool):
        self.switch_tick, self.waits_for_block = switch_tick, waits_for_block
        self.requested_at: float | None = None
        self.effective = False
        self.tick = 0
        self.new_steps: dict[int, set[int]] = {}

    def __call__(self, tick) -> str:
        self.tick = tick.index
        if tick.index >= self.switch_tick and self.requested_at is None:
            self.requested_at = time.perf_counter()
        boundary = all(w.step == 0 for w in tick.work)
        if tick.index >= self.switch_tick and (boundary or not self.waits_for_block):
            self.effective = True
        for work in tick.work:
            if self.effective and not work.commit:
                self.new_steps.setdefault(work.block, set()).add(work.step)
        return NEW if tick.index >= self.switch_tick else OLD


def _latency(preset, plan: dict, blocks: int, switch_tick: int, device) -> dict:
    preset = dataclasses.replace(preset, plan=dataclasses.replace(preset.plan, **plan))
    session = session_for(preset, device)
    switch = _Switch(switch_tick, plan.get("switch") == "recache")
    steps = preset.sampling.steps
    row = {}
    for block in session.run(switch, blocks=blocks, seed=0):
        new = switch.new_steps.get(block.index, set())
        for label, done in (("first_touched", steps - 1 in new), ("first_full", len(new) == steps)):
            if done and f"{label}_ticks" not in row:
                row[f"{label}_ticks"] = switch.tick - switch_tick
                row[f"{label}_ms"] = 1000 * (time.perf_counter() - switch.requested_at)
    row["recache_ms"] = _recache_ms(session) if plan.get("switch") == "recache" else 0.0
    return row


def _recache_ms(session: Session) -> float:
    """One recache forward over a full window, timed on its own."""
    executor = session.executors(NoiseSource(0), blocks_in_forward=1)
    list(executor.run(session.plan(4), session.prompts.conditioning(OLD)))
    start = time.perf_counter()
    executor.switch.recache(executor, session.prompts.conditioning(NEW))
    return 1000 * (time.perf_counter() - start)


def run(args: argparse.Namespace):
    device, preset = resolve_device(args.device), get_preset(args.preset)
    torch.manual_seed(0)
    rows = [
        {"plan": name, **_latency(preset, plan, args.blocks, args.switch_tick, device)} for name, plan in PLANS.items()
    ]
    settings = {"preset": args.preset, "blocks": args.blocks, "switch_tick": args.switch_tick}
    return rows, COLUMNS, settings
