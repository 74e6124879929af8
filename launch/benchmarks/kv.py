"""KV cache storage: memory of one stream's cache in the model dtype and in fp8, and what fp8 costs.

* memory: the presets' caches at their own 480x832, bf16 against fp8 (payload, scales, the bf16
  scratch and working buffer: `KVCache.nbytes`), allocated on the meta device.
* fidelity: the demo model's decoded frames with the committed K/V in fp8 against the same
  prompts and seeds with them in the model dtype (PSNR, SSIM), `--blocks` blocks per video. The
  yardstick row: the same videos with the model in bf16 against float32 (model-dtype cache).
  tiny-wan (random weights): the largest latent difference, and the relative RMS one.
* time: generation and decode seconds of each set of videos (one stream at a time, this machine,
  its load stated), and one layer's read of a full window (fp8: dequantised into the working
  buffer; model dtype: a slice) against that layer's attention, at the demo's geometry.

python -m launch.bench kv
python -m launch.bench kv --blocks 20 --prompts 4 --memory-presets self-forcing-1.3b wan-14b-causal
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import SpeedConfig
from engine.devices import resolve_device, resolve_dtype
from engine.eval.metrics import psnr, ssim
from engine.loading import build_kv_cache
from engine.runtime.kv import STORAGES
from engine.weight_paths import WeightPaths
from launch.benchmarks.adherence import eval_prompts
from launch.benchmarks.common import generate_video, session_for
from launch.presets import get_preset

COLUMNS = ["what", "preset", "storage", "kv_gib", "vs_model", "psnr_db", "ssim", "max_diff", "rel_rms", "seconds"]
READ_REPEATS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-presets", nargs="+", default=["self-forcing-1.3b", "wan-14b-causal"],
                        help="presets whose cache memory is counted (their own resolution, bf16 vs fp8)")  # fmt: skip
    add_fidelity_arguments(parser, per="storage")


def add_fidelity_arguments(parser: argparse.ArgumentParser, per: str) -> None:
    """The fidelity half's flags, shared with the fp8-weights bench (launch/benchmarks/weights.py)."""
    parser.add_argument("--preset", default="demo", help="model whose decoded frames measure fidelity")
    parser.add_argument("--prompts", type=int, default=4, help=f"videos per {per} (prompts of the adherence set)")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per video")
    parser.add_argument("--tiny-blocks", type=int, default=20, help="blocks of the tiny-wan latent comparison")
    parser.add_argument("--seed", type=int, default=0, help="first video's seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def memory_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        preset = get_preset(name)
        bytes_ = {s: build_kv_cache(preset, torch.bfloat16, "meta", storage=s).nbytes for s in STORAGES}
        for storage, size in bytes_.items():
            label = "bf16" if storage == "model" else storage
            rows.append({"what": "memory", "preset": name, "storage": label, "kv_gib": size / 2**30,
                         "vs_model": size / bytes_["model"]})  # fmt: skip
    return rows


def _videos(session, prompts, blocks: int, seed: int) -> tuple[list[np.ndarray], float]:
    videos, seconds = [], 0.0
    for i, desc in enumerate(prompts):
        frames, _, took = generate_video(session, desc.prompt, blocks, seed + i)
        videos.append(frames)
        seconds += took
    return videos, seconds


def _fidelity_row(what: str, preset: str, storage: str, run: tuple, reference: list[np.ndarray]) -> dict:
    videos, seconds = run
    return {
        "what": what, "preset": preset, "storage": storage, "seconds": seconds,
        "psnr_db": float(np.mean([psnr(v, r) for v, r in zip(videos, reference)])),
        "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, reference)])),
    }  # fmt: skip


def fidelity_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """fp8 against the model dtype on the demo model; bf16 against float32 as the yardstick."""
    preset, prompts, dtype = get_preset(args.preset), eval_prompts(args.prompts), resolve_dtype("auto", device)
    bf16, fp32 = (torch.bfloat16, "model"), (torch.float32, "model")
    runs = {}  # (model dtype, KV storage) -> (videos, seconds)
    for key in ((dtype, "model"), (dtype, "fp8"), fp32, bf16):
        if key not in runs:
            session = session_for(preset, device, dtype=key[0], speed=SpeedConfig(kv_cache=key[1]))
            _videos(session, prompts[:1], 1, args.seed)  # warm up allocators and kernels
            runs[key] = _videos(session, prompts, args.blocks, args.seed)
            print(f"{args.preset} {key[0]} {key[1]}: {runs[key][1]:.1f} s", flush=True)
    label, reference = str(dtype).removeprefix("torch."), runs[(dtype, "model")]
    return [
        {"what": "fidelity", "preset": args.preset, "storage": label, "seconds": reference[1]},
        _fidelity_row("fidelity", args.preset, f"fp8 vs {label}", runs[(dtype, "fp8")], reference[0]),
        _fidelity_row("yardstick", args.preset, "bf16 model vs float32", runs[bf16], runs[fp32][0]),
    ]


def tiny_rows(blocks: int, seed: int, device: torch.device) -> list[dict]:
    """tiny-wan with random weights: fp8 latents against model-dtype latents."""
    latents, seconds = {}, {}
    for storage in STORAGES:
        session = session_for(get_preset("tiny-wan"), device, WeightPaths(seed=3), torch.float32,
                              SpeedConfig(kv_cache=storage))  # fmt: skip
        start = time.perf_counter()
        latents[storage] = torch.cat([b.latents for b in session.run("a blue square", blocks=blocks, seed=seed)], 2)
        seconds[storage] = time.perf_counter() - start
    diff = (latents["fp8"].double() - latents["model"].double()).abs()
    relative = (diff.norm() / latents["model"].double().norm()).item()
    row = {"what": "latents", "preset": "tiny-wan", "storage": "fp8 vs float32", "seconds": seconds["fp8"]}
    return [{**row, "max_diff": diff.max().item(), "rel_rms": relative}]


def _median_seconds(fn, repeats: int = READ_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _filled_cache(preset, storage: str, dtype: torch.dtype, device: torch.device):
    """`preset`'s cache with every committed slot of its window written (random K/V)."""
    cfg, stream = preset.model, preset.stream
    cache = build_kv_cache(preset, dtype, device, storage=storage)
    shape = (cfg.num_layers, 1, stream.frames_per_block * preset.tokens_per_frame, cfg.kv_heads, cfg.head_dim)
    for frame in range(0, stream.context_frames, stream.frames_per_block):
        cache.append(
            frame, torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)
        )
    return cache


def read_costs(name: str, device: torch.device) -> dict:
    """One layer, a full window: the read (fp8: dequantise; model dtype: a slice) and the attention
    of one block's queries over it, in microseconds (median of READ_REPEATS, synchronised)."""
    preset, dtype = get_preset(name), resolve_dtype("auto", device)
    inflight = preset.stream.frames_per_block * preset.tokens_per_frame
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out, caches = {}, {s: _filled_cache(preset, s, dtype, device) for s in STORAGES}
    for storage, cache in caches.items():
        out[f"read_{storage}_us"] = 1e6 * _median_seconds(lambda c=cache: (c.read(0, inflight), sync()))
    keys, values = caches["model"].read(0, inflight)
    q = torch.randn(1, preset.model.num_heads, inflight, preset.model.head_dim, dtype=dtype, device=device)
    k, v = keys.transpose(1, 2), values.transpose(1, 2)
    if preset.model.kv_heads != preset.model.num_heads:  # grouped-query: one KV head serves several
        k, v = (t.repeat_interleave(preset.model.num_heads // preset.model.kv_heads, 1) for t in (k, v))
    out["attention_us"] = 1e6 * _median_seconds(lambda: (F.scaled_dot_product_attention(q, k, v), sync()))
    return out


def run(args: argparse.Namespace):
    device = resolve_device(args.device)
    rows = memory_rows(args.memory_presets)
    rows += fidelity_rows(args, device)
    rows += tiny_rows(args.tiny_blocks, args.seed, device)
    reads = read_costs(args.preset, device)
    print(f"{args.preset}, one layer, full window: fp8 read {reads['read_fp8_us']:.0f} us, model-dtype read "
          f"{reads['read_model_us']:.0f} us, attention of one block {reads['attention_us']:.0f} us")  # fmt: skip
    settings = {k: getattr(args, k) for k in ("memory_presets", "preset", "prompts", "blocks", "tiny_blocks", "seed")}
    settings.update(reads, device=str(device), torch_threads=torch.get_num_threads(), load_average=os.getloadavg())
    print(f"{device}, {settings['torch_threads']} thread(s), load average {settings['load_average'][0]:.1f} "
          f"on {os.cpu_count()} cores: seconds are this machine's, shared or not")  # fmt: skip
    return rows, COLUMNS, settings
