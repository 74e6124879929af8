"""Will it fit? The memory plan of presets on GPUs of given sizes, as tables (`launch.presets --fit`).

    python -m launch.presets --fit wan-14b-causal --gpu-memory 32GiB   # where each part goes
    python -m launch.presets --fit wan-14b-causal                      # at 12, 16, 24, 32, 48, 80 GiB
    python -m launch.presets --fit all                                 # every preset at every size

Plans are for a GPU at bfloat16 with the presets' real checkpoints (umT5-XXL / T5-XXL text
encoders), counted on the meta device: nothing is loaded, no GPU is needed. A cell names the
cheapest options that fit (launch/memory.py orders them) and the peak they need; "-" where
nothing fits. Table rows are Markdown.
"""

from __future__ import annotations

import torch

from engine.config import Preset
from engine.footprint import size
from engine.weight_paths import WeightPaths
from launch.memory import GIB, Counts, MemoryPlan, Options, cheapest, count

SIZES_GIB = (12, 16, 24, 32, 48, 80)
LEGEND = ("as is: no option needed; te-swap / te-cpu: --text-encoder-device swap / cpu; vae16: --vae-dtype "
          "bfloat16; kv8: --kv-cache fp8; w8: --weights fp8; off: --offload layers")  # fmt: skip


def gpu_counts(preset: Preset) -> Counts:
    """The preset on a GPU at bfloat16 with its real checkpoints."""
    return count(preset, WeightPaths(), torch.bfloat16, "cuda")


def cell(counts: Counts, gib: int) -> str:
    plan = cheapest(counts, gib * GIB)
    return "-" if plan is None else f"{plan.options.short()} ({plan.needed / GIB:.1f})"


def size_table(rows: list[Counts], sizes: tuple[int, ...] = SIZES_GIB) -> list[str]:
    """One row per preset, one column per GPU size."""
    head = "| preset | as is needs | " + " | ".join(f"{g} GiB" for g in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for counts in rows:
        needs = MemoryPlan(counts, Options(), None).needed / GIB
        lines.append(f"| {counts.preset} | {needs:.1f} | " + " | ".join(cell(counts, g) for g in sizes) + " |")
    return lines + ["", f"Cells: the cheapest options that fit (GiB needed). {LEGEND}; -: nothing fits."]


def parts_table(counts: Counts, budget: int) -> list[str]:
    """Where every part goes and what it costs, as is and with the cheapest options that fit."""
    plans = [MemoryPlan(counts, Options(), budget)]
    best = cheapest(counts, budget)
    if best is not None and best.options != Options():
        plans.append(best)
    names = ["as is"] + ([best.options.flags()] if len(plans) > 1 else [])
    lines = [f"{counts.preset} on a {size(budget)} GPU (bfloat16, real checkpoints; sizes on the device, "
             "host memory in brackets)", "", "| part | " + " | ".join(names) + " | note |",
             "|" + "---|" * (len(names) + 2)]  # fmt: skip
    for i, part in enumerate(plans[0].parts):
        shown = [_where(plan.parts[i]) for plan in plans]
        lines.append(f"| {part.name} | " + " | ".join(shown) + f" | {plans[-1].parts[i].note} |")
    for phase in plans[0].phases:
        lines.append(f"| peak: {phase} | " + " | ".join(size(p.phases.get(phase, 0)) for p in plans) + " | |")
    lines.append("| needs | " + " | ".join(size(p.needed) for p in plans) + " | |")
    return lines + ["", _verdict(counts, budget, best)]


def _where(part) -> str:
    host = f" [{size(part.host)}]" if part.host else ""
    return f"{size(part.device)}{host}"


def _verdict(counts: Counts, budget: int, best: MemoryPlan | None) -> str:
    if best is None:
        return f"nothing fits {size(budget)}: use a larger GPU, or more of them (docs/parallel.md)"
    if best.options == Options():
        return f"fits as is ({size(best.needed)} of {size(budget)})"
    return f"fits with {best.options.flags()} ({size(best.needed)} of {size(budget)})"


def print_fit(presets: list[Preset], budget: int | None) -> None:
    if len(presets) == 1 and budget is not None:
        print("\n".join(parts_table(gpu_counts(presets[0]), budget)))
        return
    sizes = SIZES_GIB if budget is None else (round(budget / GIB),)
    print("\n".join(size_table([gpu_counts(p) for p in presets], sizes)))
