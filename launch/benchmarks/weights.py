"""fp8 weights (`--weights fp8`): what they save and what they cost in fidelity, measured as the
fp8 KV cache was (launch/benchmarks/kv.py).

* memory: the presets' transformer blocks with their Linear weights in bf16 against e4m3 (+ a
  float32 scale per output channel), counted on the meta device; and the whole transformer.
* fidelity: the demo model's decoded frames with fp8 weights against the same prompts and seeds
  with native weights (PSNR, SSIM), `--prompts` videos of `--blocks` blocks. The yardstick: the
  same videos with the model in bf16 against float32.
  tiny-wan (random weights): the largest latent difference, and the relative RMS one.
* time: generation seconds of each set of videos (this machine, its load stated). The matmul is
  the native one; the per-call dequantisation of the weight is the cost.

python -m launch.bench weights
python -m launch.bench weights --blocks 20 --prompts 4 --memory-presets self-forcing-1.3b wan-14b-causal
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from engine.config import SpeedConfig
from engine.devices import resolve_device, resolve_dtype
from engine.loading import new_model
from engine.runtime.fp8_weights import blocks_bytes
from engine.weight_paths import WeightPaths
from launch.benchmarks.adherence import eval_prompts
from launch.benchmarks.common import session_for
from launch.benchmarks.kv import _fidelity_row, _videos, add_fidelity_arguments
from launch.presets import get_preset

COLUMNS = ["what", "preset", "weights", "gib", "vs_native", "psnr_db", "ssim", "max_diff", "rel_rms", "seconds"]
GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-presets", nargs="+", default=["self-forcing-1.3b", "wan-14b-causal"],
                        help="presets whose transformer bytes are counted (bf16 vs fp8 blocks)")  # fmt: skip
    add_fidelity_arguments(parser, per="setting")


def memory_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        with torch.device("meta"):
            model = new_model(get_preset(name).model).cast(torch.bfloat16)
        whole = sum(p.numel() * p.element_size() for p in model.parameters())
        native = blocks_bytes(model.blocks, "native")
        for storage in ("native", "fp8"):
            blocks = blocks_bytes(model.blocks, storage)
            label = "bf16" if storage == "native" else "fp8"
            rows.append({"what": "blocks", "preset": name, "weights": label, "gib": blocks / GIB,
                         "vs_native": blocks / native})  # fmt: skip
            total = whole - native + blocks
            rows.append({"what": "transformer", "preset": name, "weights": label, "gib": total / GIB,
                         "vs_native": total / whole})  # fmt: skip
    return rows


def fidelity_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """fp8 weights against native on the demo model; bf16 against float32 as the yardstick."""
    preset, prompts, dtype = get_preset(args.preset), eval_prompts(args.prompts), resolve_dtype("auto", device)
    runs = {}  # (model dtype, weights) -> (videos, seconds)
    for key in ((dtype, "native"), (dtype, "fp8"), (torch.float32, "native"), (torch.bfloat16, "native")):
        if key not in runs:
            session = session_for(preset, device, dtype=key[0], speed=SpeedConfig(weights=key[1]))
            _videos(session, prompts[:1], 1, args.seed)  # warm up allocators and kernels
            runs[key] = _videos(session, prompts, args.blocks, args.seed)
            print(f"{args.preset} {key[0]} {key[1]} weights: {runs[key][1]:.1f} s", flush=True)
    label, reference = str(dtype).removeprefix("torch."), runs[(dtype, "native")]
    rows = [
        {"what": "fidelity", "preset": args.preset, "weights": label, "seconds": reference[1]},
        _fidelity_row("fidelity", args.preset, f"fp8 vs {label}", runs[(dtype, "fp8")], reference[0]),
        _fidelity_row(
            "yardstick",
            args.preset,
            "bf16 model vs float32",
            runs[(torch.bfloat16, "native")],
            runs[(torch.float32, "native")][0],
        ),  # fmt: skip
    ]
    return [{("weights" if k == "storage" else k): v for k, v in row.items()} for row in rows]


def tiny_rows(blocks: int, seed: int, device: torch.device) -> list[dict]:
    """tiny-wan with random weights: fp8-weight latents against native ones."""
    latents, seconds = {}, {}
    for storage in ("native", "fp8"):
        session = session_for(get_preset("tiny-wan"), device, WeightPaths(seed=3), torch.float32,
                              SpeedConfig(weights=storage))  # fmt: skip
        start = time.perf_counter()
        latents[storage] = torch.cat([b.latents for b in session.run("a blue square", blocks=blocks, seed=seed)], 2)
        seconds[storage] = time.perf_counter() - start
    diff = (latents["fp8"].double() - latents["native"].double()).abs()
    relative = (diff.norm() / latents["native"].double().norm()).item()
    row = {"what": "latents", "preset": "tiny-wan", "weights": "fp8 vs float32", "seconds": seconds["fp8"]}
    return [{**row, "max_diff": diff.max().item(), "rel_rms": relative}]


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    rows = memory_rows(args.memory_presets)
    with torch.no_grad():
        rows += fidelity_rows(args, device)
        rows += tiny_rows(args.tiny_blocks, args.seed, device)
    settings = {k: getattr(args, k) for k in ("memory_presets", "preset", "prompts", "blocks", "tiny_blocks", "seed")}
    settings.update(device=str(device), torch_threads=torch.get_num_threads(), load_average=os.getloadavg())
    print(f"{device}, {settings['torch_threads']} thread(s), load average {settings['load_average'][0]:.1f} "
          f"on {os.cpu_count()} cores: seconds are this machine's, shared or not")  # fmt: skip
    return rows, COLUMNS, settings
