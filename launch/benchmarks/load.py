"""Load: peak host memory and time to load a multi-shard transformer checkpoint, whole vs streamed.

    python -m launch.bench load                          # Wan2.1-14B widths, 2 of its 40 blocks
    python -m launch.bench load --layers 1 --device cuda # the GPU case the streaming is for

Writes a checkpoint in the Wan2.1-T2V-14B diffusers layout (dim 5120, 40 heads, ffn 13824, text
4096; diffusers key names, `diffusion_pytorch_model-0000i-of-0000N.safetensors` shards of at most
`--shard-mb` with a `*.safetensors.index.json`), with `--layers` blocks instead of 40 (`--width`
shrinks dim and ffn by the same factor), and loads it in a fresh process per way:
* whole: what arcade did before loading streamed: the shards read as one state dict, every value
  checked, the dict assigned to the meta model, then the model moved to the device and cast;
* streamed: `load_weights(..., device=, dtypes="model")`: each tensor read, checked, moved and
  cast on its own, into a meta model already cast to the run dtype.
Columns: seconds of the load; host memory (RSS) before, peak growth and growth kept after the
load (MB); `transient` = peak growth minus what the loaded model itself keeps on the host: on a
GPU the model keeps nothing there, so this is the host memory a load needs beyond the model.
The files were just written, so they are in the page cache: times are copy and cast, not disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import WanConfig
from engine.devices import resolve_device, resolve_dtype
from engine.models.checkpoints.wan import check_fit, read_checkpoint, wan_to_diffusers
from engine.models.wan import WanModel

MB = 2**20
WAN_14B_WIDTHS = dict(dim=5120, ffn_dim=13824, num_heads=40)
INDEX = "diffusion_pytorch_model.safetensors.index.json"
WAYS = ("whole", "streamed")
COLUMNS = ["way", "device", "dtype", "seconds", "rss_before_mb", "peak_growth_mb", "kept_mb", "transient_mb"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks written (Wan2.1-14B has 40)")
    parser.add_argument("--width", type=int, default=1, help="divide dim, ffn_dim and heads by this (1: 14B widths)")
    parser.add_argument("--shard-mb", type=int, default=500, help="largest shard written, MB")
    parser.add_argument("--stored", default="bfloat16", help="dtype of the tensors in the files")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="run dtype: auto (bf16 on GPU, float32 on CPU), ...")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="loaders measured")
    parser.add_argument("--folder", type=Path, default=None, help="write the checkpoint here and keep it")


def config(layers: int, width: int = 1) -> WanConfig:
    """Wan2.1-14B's layout with `layers` blocks and widths divided by `width` (head_dim stays 128)."""
    sizes = {key: value // width for key, value in WAN_14B_WIDTHS.items()}
    return WanConfig(**sizes, num_layers=layers)


# -- writing the checkpoint ---------------------------------------------------------------------------


def _shard_plan(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Keys in model order, cut into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def write_checkpoint(cfg: WanConfig, folder: Path, *, shard_mb: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random weights for `cfg` as diffusers shards + index in `folder`, one shard in memory at a
    time. Returns sizes: files, total_mb, largest_shard_mb, largest_tensor_mb."""
    with torch.device("meta"):
        shapes = {key: tuple(v.shape) for key, v in WanModel(cfg).state_dict().items()}
    plan = _shard_plan(shapes, dtype.itemsize, shard_mb * MB)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for i, keys in enumerate(plan):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        part = {wan_to_diffusers(k): torch.empty(shapes[k]).uniform_(-0.02, 0.02, generator=generator) for k in keys}
        save_file({k: v.to(dtype) for k, v in part.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
        sizes.append((folder / name).stat().st_size)
        del part
    total = sum(sizes)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    largest_tensor = max(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
    return {"files": len(plan), "total_mb": total / MB, "largest_shard_mb": max(sizes) / MB,
            "largest_tensor_mb": largest_tensor / MB}  # fmt: skip


# -- the two ways of loading (run in a fresh process each) ------------------------------------------


def load_whole(model: WanModel, path: Path, device: torch.device, dtype: torch.dtype) -> WanModel:
    """Loading as arcade did before streaming (engine/loading.py build_model): the checkpoint is
    kept alive until the model is on its device in its dtype, as it was there."""
    ckpt = read_checkpoint(path)
    check_fit(model, ckpt)
    model.load_state_dict(ckpt.state, strict=True, assign=True)
    model = model.to(device).cast(dtype)
    del ckpt
    return model


def load_streamed(model: WanModel, path: Path, device: torch.device, dtype: torch.dtype) -> WanModel:
    from engine.models.checkpoints.wan import load_weights

    model.cast(dtype)  # meta: each parameter takes the dtype it will be loaded in
    load_weights(model, path, device=device, dtypes="model")
    return model


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def measure_here(path: Path, cfg: WanConfig, way: str, device: str, dtype: str) -> dict:
    """Load `path` into a meta `cfg` model the `way` named; host memory and seconds of this process
    (meant to run alone in a fresh one: ru_maxrss is the process's peak so far)."""
    torch.set_grad_enabled(False)
    target = resolve_device(device)
    run_dtype = resolve_dtype(dtype, target)
    with torch.device("meta"):
        model = WanModel(cfg)
    if target.type == "cuda":
        torch.zeros(1, device=target)  # the CUDA context's host memory is not the load's
    before = rss_mb()
    start = time.perf_counter()
    model = (load_whole if way == "whole" else load_streamed)(model, path, target, run_dtype)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    on_host = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu") / MB
    kept = rss_mb() - before
    return {"way": way, "device": str(target), "dtype": str(run_dtype).removeprefix("torch."),
            "seconds": seconds, "rss_before_mb": before, "peak_growth_mb": peak - before, "kept_mb": kept,
            "model_on_host_mb": on_host, "transient_mb": peak - before - on_host}  # fmt: skip


def measure(path: Path, cfg: WanConfig, way: str, device: str = "cpu", dtype: str = "auto", timeout: float = 900):
    """`measure_here` in a fresh Python process (its own peak RSS); the row it prints, as a dict."""
    args = json.dumps([str(path), asdict(cfg), way, device, dtype])
    code = "import sys; from launch.benchmarks.load import child; child(sys.argv[1])"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{way} load failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(args: str) -> None:
    path, fields, way, device, dtype = json.loads(args)
    fields["patch_size"] = tuple(fields["patch_size"])
    print(json.dumps(measure_here(Path(path), WanConfig(**fields), way, device, dtype)))


def run(args: argparse.Namespace):
    cfg = config(args.layers, args.width)
    stored = resolve_dtype(args.stored, torch.device("cpu"))
    folder = args.folder or Path(tempfile.mkdtemp(prefix="arcade-load-"))
    try:
        sizes = write_checkpoint(cfg, folder, shard_mb=args.shard_mb, dtype=stored)
        print("checkpoint: " + "  ".join(f"{k} {v:.4g}" for k, v in sizes.items()))
        rows = [measure(folder, cfg, way, args.device, args.dtype) for way in args.ways]
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    settings = {"config": asdict(cfg), "stored": args.stored, "shard_mb": args.shard_mb, "checkpoint": sizes}
    settings.update(torch_threads=threads, load_average=os.getloadavg(), cores=os.cpu_count())
    print(f"load average {settings['load_average'][0]:.2f} on {os.cpu_count()} cores; OMP_NUM_THREADS {threads}")
    return rows, COLUMNS, settings
