"""The GPU report: every speed variant of the real presets, one command, under 8 minutes on an H200.

    python -m launch.bench gpu-report --quick      # ~1 minute: the environment and one short variant
    python -m launch.bench gpu-report              # the whole report (random weights, real sizes)
    python -m launch.bench gpu-report --tiny --device cpu   # the same code path on tiny presets

Variants: self-forcing-1.3b eager, compiled, compiled + CUDA graphs and with an fp8 KV cache;
wan-14b-causal, magi-1-4.5b-distill, skyreels-v2-df-1.3b and longlive2-5b (LongLive-2.0 on
Wan2.2-TI2V-5B, 1280x704) eager; and two smaller cards, by a memory cap: self-forcing-1.3b at
12 GB (text encoder on the host, bf16 VAE, fp8 KV, blocks streamed from host memory) and wan-14b-causal
at 32 GB (text encoder on the host, blocks streamed from host memory, fp8 weights and KV), each
against its resident variant and the offload model's prediction (launch/throughput.py). Each runs in its own process
(launch/benchmarks/gpu_variant.py) under a time budget, so a failure (out of memory, a compile
error) is recorded and the rest go on, and the whole run ends by `--deadline-s`.
Per variant: steady-state FPS (denoising; and with decoding), first-frame latency from session
start and from process start, ms per forward, the profiler's attention / linear split, achieved
TFLOP/s against the measured matmul peak and the analytic limit (engine/models/flops.py: the FPS if
every FLOP of a block ran at the peak, or at a nominal 700 TFLOP/s), KV memory and peak device
memory. The measured forward and decode times then go into the cascade throughput model
(launch/throughput.py). Written to `--out`: report.json and report.md (card, torch, command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ConfigError
from engine.devices import resolve_device, resolve_dtype
from engine.loading import build_kv_cache
from launch.benchmarks import gpu_env, gpu_markdown
from launch.benchmarks.gpu_variant import VariantSpec
from launch.benchmarks.plan_flops import steady_flops
from launch.benchmarks.timing import guidance_branches, limit_fps
from launch.presets import get_preset
from launch.report import environment
from launch.split import rank_splits
from launch.throughput import HOST_LINKS, NVLINK, block_forward_s, offload_forward_s

NOMINAL_TFLOPS = 700.0  # dense bf16 an H100 sustains in practice (the yardstick for the limit)
CASCADE_GPUS = 5  # Block Cascading's published setting
COLUMNS = ["variant", "status", "fps", "fps_est", "fps_decoded", "first_frame_s", "startup_s", "forward_ms",
           "attention", "linear", "tflops", "mfu", "limit_fps_peak", "limit_fps_700", "kv_gib", "peak_gib"]  # fmt: skip
TINY = {"self-forcing-1.3b": "tiny-wan", "wan-14b-causal": "tiny-wan", "skyreels-v2-df-1.3b": "skyreels-v2-df-tiny",
        "magi-1-4.5b-distill": "magi-1-tiny", "longlive2-5b": "tiny-wan22"}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    compile: str = "off"
    kv_cache: str = "model"
    budget_s: float = 60.0
    """Seconds from process start after which no new block starts (an H200's run in mind)."""
    weights: str = "native"
    offload: str = "none"
    text_encoder_device: str = "model"
    vae_dtype: str = "float32"
    memory_gb: float | None = None
    """A smaller card: the process may use this many GB (10^9 bytes) of the device, through
    torch.cuda.set_per_process_memory_fraction (not applied off CUDA)."""
    resident: str | None = None
    """The variant of the same preset with every block on the device: its measured forward and
    FPS feed the offload model's prediction of this one (launch/throughput.py offload_fps)."""


VARIANTS = (  # the order they run in: when --deadline-s runs out, the last ones are skipped
    Variant("sf-eager", "self-forcing-1.3b", budget_s=40),
    Variant("sf-compiled", "self-forcing-1.3b", compile="default", budget_s=100),
    Variant("sf-graphs", "self-forcing-1.3b", compile="graphs", budget_s=100),
    Variant("sf-eager-fp8kv", "self-forcing-1.3b", kv_cache="fp8", budget_s=35),
    Variant("wan14b-eager", "wan-14b-causal", budget_s=55),
    Variant("magi-eager", "magi-1-4.5b-distill", budget_s=60),
    Variant("skyreels-eager", "skyreels-v2-df-1.3b", budget_s=60),
    Variant("ll2-eager", "longlive2-5b", budget_s=60),
    Variant(  # fits 12 GiB by the memory plan (launch.presets --fit), streaming the blocks to measure offload
        "sf-12gb",
        "self-forcing-1.3b",
        budget_s=60,
        kv_cache="fp8",
        offload="layers",
        text_encoder_device="cpu",
        vae_dtype="bfloat16",
        memory_gb=12,
        resident="sf-eager",
    ),
    Variant(
        "wan14b-32gb",
        "wan-14b-causal",
        kv_cache="fp8",
        budget_s=240,
        weights="fp8",
        offload="layers",
        text_encoder_device="cpu",
        memory_gb=32,
        resident="wan14b-eager",
    ),
)
BY_NAME = {v.name: v for v in VARIANTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/gpu-report"), help="folder for report.json, report.md")
    parser.add_argument("--quick", action="store_true",
                        help="environment, matmul peak and one short variant (~1 minute): run this first")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=list(BY_NAME), help="variants to run (none given: every one)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("--tiny", action="store_true", help="each preset's tiny stand-in (a CPU check of the report)")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks per variant (after the warm-up)")
    parser.add_argument("--deadline-s", type=float, default=440.0, help="the whole run's time limit in seconds")
    parser.add_argument("--budget-s", type=float,
                        help="every variant's time budget in seconds (default: each its own, for an H200)")  # fmt: skip
    parser.add_argument("--inject-failure", choices=list(BY_NAME), metavar="VARIANT",
                        help="make this variant fail after building (checks that the others still run)")  # fmt: skip


def selected(args: argparse.Namespace) -> list[Variant]:
    names = args.variants or [v.name for v in VARIANTS]
    if args.blocks < 1:
        raise ConfigError(f"--blocks must be at least 1, got {args.blocks}")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ConfigError(f"--budget-s must be positive, got {args.budget_s}")
    if args.quick and args.inject_failure not in (None, names[0]):
        raise ConfigError(f"--quick runs {names[0]} alone: --inject-failure {args.inject_failure} would not run")
    if args.inject_failure and args.inject_failure not in names:
        raise ConfigError(f"--inject-failure {args.inject_failure}: not among the variants run ({', '.join(names)})")
    variants = [BY_NAME[n] for n in names][: 1 if args.quick else None]
    budget = args.budget_s or (40.0 if args.quick else None)
    return [dataclasses.replace(v, budget_s=budget) for v in variants] if budget else variants


def warmup_blocks(preset_name: str) -> int:
    """Blocks before timing: a sequential plan until its window has filled and begun to slide (the
    steady state the analytic limit counts, and the last new layout a compiled forward meets); a
    pyramid or segment plan past its first block (the pipeline's fill)."""
    preset = get_preset(preset_name)
    if preset.plan.schedule != "sequential":
        return 1
    return max(2, preset.stream.window_frames // preset.stream.frames_per_block)


def spec_for(variant: Variant, args: argparse.Namespace, budget_s: float) -> VariantSpec:
    preset = TINY[variant.preset] if args.tiny else variant.preset
    quick = args.quick
    return VariantSpec(
        name=variant.name, preset=preset, compile=variant.compile, kv_cache=variant.kv_cache, weights=variant.weights,
        offload=variant.offload, text_encoder_device=variant.text_encoder_device, vae_dtype=variant.vae_dtype,
        memory_gb=variant.memory_gb,
        device=args.device,
        dtype=args.dtype, warmup=1 if quick else warmup_blocks(preset), blocks=min(args.blocks, 2) if quick else
        args.blocks, profile=not quick, budget_s=budget_s, inject_failure=args.inject_failure == variant.name,
        per_forward=get_preset(preset).plan.schedule != "sequential",
    )  # fmt: skip


def run_variant(spec: VariantSpec, hard_s: float, folder: Path) -> dict:
    """One child process; killed (its whole process group: compile workers too) after `hard_s`."""
    spec_path, out_path = folder / f"{spec.name}.spec.json", folder / f"{spec.name}.json"
    spawned = time.time()
    spec_path.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(spec, spawned_at=spawned))))
    command = [sys.executable, "-m", "launch.benchmarks.gpu_variant", str(spec_path), str(out_path)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        output, _ = child.communicate(timeout=hard_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        timed_out = True
    finally:  # Ctrl-C here must not leave a child holding the GPU (it has a session of its own)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    row = json.loads(out_path.read_text()) if out_path.exists() else {"name": spec.name, "preset": spec.preset}
    row["wall_s"] = time.time() - spawned
    if timed_out:
        row["status"] = f"timed out: killed after {hard_s:.0f} s (last phase: {row.get('status', 'starting')})"
    elif row.get("status") in (None, "started"):
        row["status"] = f"failed: the process exited with {child.returncode}: {_last_line(output)}"
    if not row["status"].startswith("ok"):
        row["log_tail"] = output[-3000:]
    return row


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_all(variants: list[Variant], args: argparse.Namespace, deadline: float) -> Iterator[dict]:
    """Each variant's row as it finishes, in order; those the deadline leaves no time for are skipped."""
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as folder:
        for i, variant in enumerate(variants):
            left = deadline - time.time()
            if left < 15:
                yield {"name": variant.name, "preset": variant.preset, "status": "skipped: --deadline-s spent"}
                continue
            budget = min(variant.budget_s, left - 10)
            spec = spec_for(variant, args, budget)
            row = run_variant(spec, min(1.5 * budget + 20, left), Path(folder))
            print(f"[{i + 1}/{len(variants)}] {variant.name} ({spec.preset}): {_summary(row)}", file=sys.stderr,
                  flush=True)  # fmt: skip
            yield row


def _summary(row: dict) -> str:
    fps = f"{row['fps']:.1f} FPS, " if row.get("fps") else ""
    return f"{fps}{row['status']} ({row['wall_s']:.0f} s)"


def analyse(row: dict, peak_tflops: float) -> dict:
    """Achieved TFLOP/s against the peak; the analytic limits of the preset's steady state (its
    FPS if every FLOP ran at the measured peak, or at the nominal 700 TFLOP/s); and the FPS the
    steady state would reach at the TFLOP/s the variant achieved (fps_est: for plans whose blocks
    did not finish within the budget, and as a check on the measured FPS of the others)."""
    row["variant"] = row["name"]
    if "preset" not in row or not row.get("status", "").startswith(("ok", "partial", "timed out")):
        return row
    preset, flops = get_preset(row["preset"]), steady_flops(row["preset"])
    row["analytic_block_tflop"] = flops / 1e12
    row["limit_fps_peak"] = limit_fps(preset, flops, peak_tflops)
    row["limit_fps_700"] = limit_fps(preset, flops, NOMINAL_TFLOPS)
    if row.get("tflops"):
        row["mfu"] = row["tflops"] / peak_tflops
        row["fps_est"] = limit_fps(preset, flops, row["tflops"])
    return row


def cascade_rows(rows: list[dict]) -> list[dict]:
    """The throughput model fed with each sequential variant's measured forward and decode times:
    one GPU, and the best split of five on NVLink (Block Cascading's setting)."""
    model = []
    for row in rows:
        preset = get_preset(row["preset"])
        capped = BY_NAME.get(row["name"], Variant("", "")).memory_gb is not None  # one small card: not a split
        if not row.get("forward_ms") or preset.plan.schedule != "sequential" or capped:
            continue
        forward_s = block_forward_s(row["preset"], {row["preset"]: row["forward_ms"]})
        decode_s = row["decode_ms"] / 1000
        for gpus in (1, CASCADE_GPUS):
            ranked = rank_splits(preset, gpus, NVLINK, offset=1, context="joint", forward_s=forward_s,
                                 decode_s=decode_s)  # fmt: skip
            if not ranked:
                continue
            split, timing = ranked[0]
            model.append({"variant": row["name"], "preset": row["preset"], "gpus": gpus, "split": str(split),
                          "forward_ms": 1000 * forward_s, "decode_ms": row["decode_ms"], "fps": timing.fps,
                          "denoise_fps": timing.denoise_fps, "latency_s": timing.latency_s})  # fmt: skip
    return model


def offload_rows(rows: list[dict]) -> list[dict]:
    """Each memory-capped variant against its resident variant: measured FPS, and the FPS the offload
    model predicts from the resident forward, the streamed block's bytes and the measured pinned
    host-to-device bandwidth (else PCIe 5's nominal 50 GB/s)."""
    by_name, model = {row["name"]: row for row in rows}, []
    for variant in VARIANTS:
        row, resident = by_name.get(variant.name), by_name.get(variant.resident or "")
        if row is None or variant.memory_gb is None:
            continue
        options = [f"--{k.replace('_', '-')} {getattr(variant, k)}" for k in ("text_encoder_device", "vae_dtype",
                   "weights", "offload", "kv_cache") if getattr(variant, k) != getattr(Variant("", ""), k)]  # fmt: skip
        line = {"variant": variant.name, "memory_cap": row.get("memory_cap"), "options": " ".join(options),
                "fps": row.get("fps"), "peak_gib": row.get("peak_gib"), "h2d_gbps": row.get("h2d_gbps"),
                "block_mb": row.get("block_mb")}  # fmt: skip
        if resident and resident.get("fps") and row.get("fps"):
            line["resident_fps"], line["vs_resident"] = resident["fps"], row["fps"] / resident["fps"]
        if resident and resident.get("forward_ms") and row.get("block_mb"):
            layers = get_preset(row["preset"]).model.num_layers
            timing = offload_forward_s(resident["forward_ms"] / 1000, layers, row["block_mb"] * 1e6,
                                       row.get("h2d_gbps") or HOST_LINKS["pcie5"])  # fmt: skip
            line["bound"] = timing.bound
            line["fps_model"] = resident.get("fps", 0) * resident["forward_ms"] / 1000 / timing.forward_s
        else:
            line["note"] = f"no prediction: {variant.resident} measured no forward"
        model.append(line)
    return model


def analytic_limits(presets: list[str], peak_tflops: float | None = None) -> list[dict]:
    """Each preset's steady-state FLOPs per block (plan_flops.py) and the FPS they allow."""
    limits = []
    for name in dict.fromkeys(presets):
        preset, flops = get_preset(name), steady_flops(name)
        row = {"preset": name, "plan": preset.plan.schedule, "block_tflop": flops / 1e12,
               "fps_at_700": limit_fps(preset, flops, NOMINAL_TFLOPS)}  # fmt: skip
        if peak_tflops:
            row["fps_at_peak"] = limit_fps(preset, flops, peak_tflops)
        limits.append(row)
    return limits


def kv_memory(presets: list[str]) -> list[dict]:
    """One stream's KV cache per preset in bf16 and in fp8 storage, allocated on the meta device
    with the preset's own window (a run's cache, sized by its plan, is its variant's kv_gib)."""
    rows = []
    for name in dict.fromkeys(presets):
        preset = get_preset(name)
        rows.append({"preset": name, "kv_gib_bf16": _kv_gib(preset, "model"), "kv_gib_fp8": _kv_gib(preset, "fp8")})
    return rows


def _kv_gib(preset, storage: str) -> float | str:
    if preset.plan.compute != "selective":
        return 0.0  # whole-window plans recompute the context and keep no cache
    options = {} if storage == "model" else {"storage": storage}
    if options and "storage" not in inspect.signature(build_kv_cache).parameters:
        return "not available"
    cache = build_kv_cache(preset, torch.bfloat16, "meta", batch=guidance_branches(preset), **options)
    return cache.nbytes / 2**30


def run(args: argparse.Namespace):
    start = time.time()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    variants = selected(args)
    env = gpu_env.environment(device, dtype)
    presets = [TINY[v.preset] if args.tiny else v.preset for v in variants]
    report = {
        "environment": env | environment(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "variants": [],
        "anchors": gpu_markdown.ANCHORS,
        "errors": {},
    }
    report["analytic_limits"] = _section(report, "analytic_limits", analytic_limits, presets, env["peak_tflops"])
    report["kv_memory"] = _section(report, "kv_memory", kv_memory, presets)
    for row in run_all(variants, args, start + args.deadline_s):
        report["variants"].append(_section(report, row["name"], analyse, row, env["peak_tflops"]) or row)
        _write(report, args.out, start)  # a report killed later still has every variant so far
    report["cascade_model"] = _section(report, "cascade_model", cascade_rows, report["variants"])
    report["offload_model"] = _section(report, "offload_model", offload_rows, report["variants"])
    _write(report, args.out, start)
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}", file=sys.stderr)
    return report["variants"], COLUMNS, {"out": str(args.out), "card": env["card"], "torch": torch.__version__}


def _section(report: dict, name: str, make, *args):
    """One part of the report; its failure is recorded (report["errors"]) and the rest is kept."""
    try:
        return make(*args)
    except Exception as err:  # noqa: BLE001  (minutes of measurements must not be lost to one table)
        report["errors"][name] = f"{type(err).__name__}: {err}"
        return []


def _write(report: dict, out: Path, start: float) -> None:
    report = {"analytic_limits": [], "kv_memory": [], "cascade_model": [], "offload_model": [], **report,
              "wall_s": time.time() - start}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(gpu_markdown.render(report, COLUMNS))
