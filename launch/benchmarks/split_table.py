"""The tables of `launch.bench cascade-model` about splitting G GPUs into cascade x sp (+ decode).

Bytes: what one layer moves per rank under sp N, and what a forward's all-to-alls cost per link.
Splits: every factorisation of each GPU count, on each link, ideal (no communication, perfect
1/N) and modelled, with the launcher's refusals noted. Two machines: which dimension crosses
InfiniBand when each machine has NVLink inside. Choices: launch/split.py's pick per count and link.
All of it is launch/throughput.py's model; nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse

from launch.presets import get_preset
from launch.split import LABELS, choose_split, refusal
from launch.throughput import (
    INFINIBAND,
    LINKS,
    NVLINK,
    PUBLISHED_5_GPUS,
    Split,
    a2a_bytes_per_layer,
    activation_bytes_per_layer,
    kv_bytes_per_layer,
    latent_bytes,
    sp_comm_s,
    split_time,
    splits,
)

BYTES_COLUMNS = ["preset", "sp", "payload_MB", "a2a_MB", "forward_MB", "kv_gather_MB"] + [f"{k}_ms" for k in LINKS]
SPLIT_COLUMNS = ["preset", "link", "gpus", "split", "plan", "ideal_fps", "fps", "denoise_fps", "published",
                 "tick_ms", "sp_ms", "gather_ms", "latency_s", "note"]  # fmt: skip
NODE_COLUMNS = ["preset", "gpus", "split", "context", "crosses_ib", "tick_ms", "sp_ms", "gather_ms", "fps",
                "denoise_fps", "note"]  # fmt: skip
MB = 1e6


def bytes_rows(presets: list[str], sps: list[int]) -> list[dict]:
    """Per layer and rank: the all-to-all payload (q, k, v, out of one block), what a rank sends,
    a forward's worth, and the K/V a cascade stage gathers per in-flight block; then the sp
    communication of one forward (all-to-alls and the output all-gather) on each link."""
    rows = []
    for name in presets:
        preset = get_preset(name)
        for sp in [s for s in sps if s > 1]:
            row = {"preset": name, "sp": sp, "payload_MB": activation_bytes_per_layer(preset) / MB,
                   "a2a_MB": a2a_bytes_per_layer(preset, sp) / MB,
                   "forward_MB": a2a_bytes_per_layer(preset, sp) * preset.model.num_layers / MB,
                   "kv_gather_MB": kv_bytes_per_layer(preset) / sp / MB,
                   "latent_MB": latent_bytes(preset) / MB}  # fmt: skip
            rows.append(row | {f"{key}_ms": 1000 * sp_comm_s(preset, sp, 1, link) for key, link in LINKS.items()})
    return rows


def _label(split: Split) -> str:
    return f"{split.cascade}x{split.sp}" + ("+d" if split.decode_rank else "")


def split_rows(args: argparse.Namespace, forward: dict[str, float]) -> list[dict]:
    rows = []
    for name in args.presets:
        preset = get_preset(name)
        for key in args.links:
            for gpus in args.gpus:
                for split in splits(gpus, args.sp):
                    rows.append(_split_row(args, preset, forward[name], key, split))
    return rows


def _split_row(args, preset, forward_s: float, key: str, split: Split) -> dict:
    t = split_time(preset, forward_s, split, args.split_offset, args.split_context, LINKS[key],
                   decode_s=args.decode_ms / 1000, **_options(args))  # fmt: skip
    plan = f"offset {args.split_offset} {args.split_context}" if split.cascade > 1 else "sequential"
    published = PUBLISHED_5_GPUS.get(preset.name) if split.gpus == 5 else None
    return {"preset": preset.name, "link": key, "gpus": split.gpus, "split": _label(split), "plan": plan,
            "ideal_fps": t.ideal_fps, "fps": t.fps, "denoise_fps": t.denoise_fps,
            "published": "" if published is None else published, "tick_ms": 1000 * t.tick_s,
            "sp_ms": 1000 * t.sp_comm_s, "gather_ms": 1000 * t.cascade_comm_s, "latency_s": t.latency_s,
            "note": refusal(preset, split, args.split_offset) or ""}  # fmt: skip


def _options(args: argparse.Namespace) -> dict:
    return {"waves": args.sp_efficiency == "waves", "sp_overhead_s": args.sp_overhead_ms / 1000}


def placements(node_gpus: int) -> list[tuple[Split, str]]:
    """(split, dimension crossing machines) for two machines of `node_gpus`: the cascade crosses
    when a whole sp group fits in a machine; sp crosses when each group can put N/2 ranks on each
    machine (every rank's cascade peers then sit in its own machine)."""
    found = []
    for split in splits(2 * node_gpus):
        if split.decode_rank:
            continue  # a decode rank moves one block of latents per block: not the question here
        if node_gpus % split.sp == 0 and split.cascade > 1:
            found.append((split, "cascade"))
        if split.sp % 2 == 0 and node_gpus % (split.sp // 2) == 0:
            found.append((split, "sp"))
    return found


def node_rows(args: argparse.Namespace, forward: dict[str, float]) -> list[dict]:
    """Both contexts: joint puts the cascade's gather on the critical path, lagged hides it."""
    rows = []
    for name in args.presets:
        preset = get_preset(name)
        for context in ("joint", "lagged"):
            for split, crossing in placements(args.node_gpus):
                if split.cascade == 1 and context == "lagged":
                    continue
                rows.append(_node_row(args, preset, forward[name], split, crossing, context))
    return rows


def _node_row(args, preset, forward_s: float, split: Split, crossing: str, context: str) -> dict:
    crosses = {"cascade_link": INFINIBAND} if crossing == "cascade" else {"sp_cross": INFINIBAND}
    t = split_time(preset, forward_s, split, args.split_offset, context, NVLINK, decode_s=args.decode_ms / 1000,
                   **crosses, **_options(args))  # fmt: skip
    return {"preset": preset.name, "gpus": f"2 x {args.node_gpus}", "split": _label(split),
            "context": context if split.cascade > 1 else "-", "crosses_ib": crossing, "tick_ms": 1000 * t.tick_s,
            "sp_ms": 1000 * t.sp_comm_s, "gather_ms": 1000 * t.cascade_comm_s, "fps": t.fps,
            "denoise_fps": t.denoise_fps, "note": refusal(preset, split, args.split_offset) or ""}  # fmt: skip


def choice_rows(args: argparse.Namespace, forward: dict[str, float]) -> list[dict]:
    rows = []
    for name in args.presets:
        for key in args.links:
            for gpus in args.gpus:
                choice = choose_split(name, gpus, key, offset=args.split_offset, context=args.split_context,
                                      forward_s=forward[name], decode_s=args.decode_ms / 1000,
                                      objective=args.objective, **_options(args))  # fmt: skip
                rows.append({"preset": name, "link": LABELS[key], "gpus": gpus, "split": _label(choice.split),
                             "fps": choice.time.fps, "reason": f"{name}: {choice.reason}"})  # fmt: skip
    return rows
