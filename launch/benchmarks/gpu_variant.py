"""One variant of the GPU report, measured in a process of its own.

    python -m launch.benchmarks.gpu_variant SPEC.json RESULT.json

`launch.bench gpu-report` starts one of these per variant, so an out-of-memory, a compile
failure or a hung kernel costs that variant alone, each variant's peak memory is its own, and
start-up (imports, CUDA, building with random weights) is measured from a real process start.
The result file is rewritten after every phase: a variant killed at its time limit still
reports what it measured. Phases:

1. speed and memory options (engine.config.SpeedConfig): an option this build or device lacks
   makes the variant "not available: <reason>" ("CUDA only: ..." for CUDA graphs off CUDA); a
   smaller card is a memory cap (`memory_gb`: torch.cuda.set_per_process_memory_fraction), and the
   pinned host-to-device bandwidth is measured (what streamed blocks are copied at);
2. build the session with seeded random weights (the preset's real-size VAE included);
3. one stream: the first block decoded (first-frame latency from session start, and from process
   start), `warmup` blocks, `blocks` timed blocks: denoising and decoding are timed apart, with a
   device sync at the edge of each, and the forwards each block ran are counted (RunStats.calls);
4. one more block under the profiler (attention / linear / rest), if the budget leaves time.
The soft budget ends the stream early (after a whole block) and says so.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.config import ConfigError, Preset
from engine.devices import SetupError, resolve_device, resolve_dtype
from engine.models.vae import to_uint8
from engine.runtime.session import Session
from engine.weight_paths import WeightPaths
from launch.benchmarks.forward_clock import BudgetSpent, ForwardClock
from launch.benchmarks.timing import calls_flops, profiled_shares, sync
from launch.build import build_session
from launch.presets import get_preset
from launch.threads import configure_threads

PROMPT = "a red circle moving left"
GIB = 2**30
MEMORY_DEFAULTS = {"weights": "native", "offload": "none", "text_encoder_device": "model", "vae_dtype": "float32"}
MEMORY_OPTIONS = tuple(MEMORY_DEFAULTS)


@dataclass(frozen=True)
class VariantSpec:
    """What the report asks one child process to measure."""

    name: str
    preset: str
    compile: str = "off"
    kv_cache: str = "model"
    weights: str = "native"
    offload: str = "none"
    text_encoder_device: str = "model"
    vae_dtype: str = "float32"
    memory_gb: float | None = None
    """Cap the device memory this process may use (CUDA: set_per_process_memory_fraction)."""
    device: str = "auto"
    dtype: str = "auto"
    warmup: int = 2
    blocks: int = 4
    profile: bool = True
    budget_s: float = 60.0
    """Soft: no new block starts after this many seconds from the process start."""
    spawned_at: float = 0.0
    """time.time() when the report started this process (0: this process's own start)."""
    per_forward: bool = False
    """Time each forward and stop inside a block when the budget is spent (plans whose blocks
    take minutes); else whole blocks only."""
    inject_failure: bool = False
    """Raise after building (the report's check that one variant's failure stops no other)."""


class Unavailable(Exception):
    """A variant this build or device cannot run: recorded as its status, not as a failure."""


class Recorder:
    """The variant's result, written to `path` after every phase."""

    def __init__(self, path: Path, spec: VariantSpec):
        self.path, self.row = path, {"name": spec.name, "preset": spec.preset, "compile": spec.compile,
                                     "kv_cache": spec.kv_cache, "weights": spec.weights, "offload": spec.offload,
                                     "text_encoder_device": spec.text_encoder_device, "vae_dtype": spec.vae_dtype,
                                     "status": "started"}  # fmt: skip

    def update(self, **fields) -> None:
        self.row |= fields
        self.path.write_text(json.dumps(self.row, indent=1))


def speed_config(spec: VariantSpec, device: torch.device):
    """The variant's SpeedConfig (None where this build has none and the variant asks for nothing)."""
    memory = {k: getattr(spec, k) for k in MEMORY_OPTIONS if getattr(spec, k) != MEMORY_DEFAULTS[k]}
    plain = spec.compile == "off" and spec.kv_cache == "model" and not memory
    try:
        from engine.config import SpeedConfig
    except ImportError:
        SpeedConfig = None  # noqa: N806
    if SpeedConfig is None or "speed" not in inspect.signature(build_session).parameters:
        if plain:
            return None
        raise Unavailable("not available: this build has no speed options (SpeedConfig, build_session(speed=))")
    try:
        speed = SpeedConfig(compile=spec.compile, kv_cache=spec.kv_cache, **memory)
        speed.check_device(device.type)
    except (ConfigError, TypeError) as err:  # TypeError: a build whose SpeedConfig lacks the memory options
        raise Unavailable(_refusal(spec, device, err)) from err
    return speed


def cap_memory(spec: VariantSpec, device: torch.device) -> str | None:
    """Hold the process to `memory_gb` of the device, as on a smaller card; what was done, in words."""
    if spec.memory_gb is None:
        return None
    if device.type != "cuda":
        return f"{spec.memory_gb:g} GB cap not applied: {device.type} has no per-process memory fraction"
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_gb * 1e9 / total), device)
    return f"capped at {spec.memory_gb:g} GB of {total / 1e9:.1f} GB"


def host_to_device_gbps(device: torch.device, megabytes: int = 256) -> float | None:
    """Pinned host -> device copy bandwidth, GB/s (the median of 5 copies; None off CUDA)."""
    if device.type != "cuda":
        return None
    host = torch.empty(megabytes * 2**20, dtype=torch.uint8).pin_memory()
    target = torch.empty_like(host, device=device)
    times = []
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return host.numel() / sorted(times)[2] / 1e9


def memory_fields(session: Session) -> dict:
    """Where the weights went: the streamed blocks' bytes (per block) and the slots on the device."""
    memory = getattr(session.executors, "memory", None)
    streamed = getattr(memory, "streamed", None)
    if streamed is None:
        return {}
    blocks = len(streamed) - streamed.resident
    return {"streamed_blocks": blocks, "block_mb": streamed.host_bytes / max(blocks, 1) / 1e6,
            "slots_gib": streamed.slot_bytes / GIB, "copies": streamed.copies}  # fmt: skip


def _refusal(spec: VariantSpec, device: torch.device, err: Exception) -> str:
    if spec.compile == "graphs" and device.type != "cuda":
        return f"CUDA only: {err}"
    return f"not available: {err}"


def build(spec: VariantSpec, rec: Recorder) -> Session:
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    speed = speed_config(spec, device)
    rec.update(device=str(device), dtype=str(dtype).removeprefix("torch."), import_s=_since_spawn(spec),
               memory_cap=cap_memory(spec, device), h2d_gbps=host_to_device_gbps(device))  # fmt: skip
    start = time.perf_counter()
    options = {} if speed is None else {"speed": speed}
    session = build_session(get_preset(spec.preset), WeightPaths(random=True), device, dtype, **options)
    configure_threads(None, session.model, device)
    sync(device)
    line = getattr(session.executors, "speed_line", None)
    rec.update(build_s=time.perf_counter() - start, speed_line=line, model_gib=_allocated(device))
    if spec.inject_failure:
        raise RuntimeError("injected failure (--inject-failure)")
    return session


class Decoder:
    """The session's decoder, or None with the reason when its reset says it cannot decode (SetupError)."""

    def __init__(self, session: Session):
        self.decoder, self.note = session.decoder, None
        try:
            self.decoder.reset()
        except SetupError as err:
            self.decoder, self.note = None, f"decode: not available ({err})"

    def __call__(self, latents: torch.Tensor) -> None:
        if self.decoder is not None:
            to_uint8(self.decoder.decode(latents))  # the frames on the host, as a viewer gets them


def stream(session: Session, spec: VariantSpec, rec: Recorder) -> None:
    """Phases 3 and 4 on one stream."""
    device, preset = session.device, session.preset
    clock = _install_clock(session, spec) if spec.per_forward else None
    blocks = spec.warmup + spec.blocks + (1 if spec.profile else 0)
    start = time.perf_counter()
    run = session.run(PROMPT, blocks=blocks, seed=0)
    decode = Decoder(session)
    marks: list[dict] = []  # per block: denoise and decode seconds, forwards and calls so far
    try:
        for index in range(spec.warmup + spec.blocks):
            marks.append(_timed_block(run, decode, device))
            if index == 0:
                rec.update(first_frame_s=time.perf_counter() - start, startup_s=_since_spawn(spec),
                           first_frame="decoded" if decode.decoder else "latents", decode_note=decode.note)  # fmt: skip
            if _since_spawn(spec) > spec.budget_s and index + 1 < spec.warmup + spec.blocks:
                rec.update(note=f"budget of {spec.budget_s:.0f} s: stopped after {index + 1} blocks")
                break
    except BudgetSpent:
        forwards = len(clock.forwards) if clock else 0
        rec.update(note=f"budget of {spec.budget_s:.0f} s: stopped inside block {len(marks)} ({forwards} forwards)")
    rec.update(
        **steady(preset, marks, spec.warmup),
        **memory_fields(session),
        kv_gib=run.kv_bytes / GIB,
        peak_gib=_peak(device),
        block_s=[round(m["denoise_s"], 4) for m in marks],
    )  # compiles show as spikes here
    if clock is not None:  # FPS only where a block after the first finished; forwards in any case
        if spec.profile and clock.shares is None:
            _profile_forwards(run, clock)
        rec.update(**clock.summary(marks[0]["end"] if marks else None), **(clock.shares or {}))
    elif spec.profile:
        _profile_block(run, marks, spec, rec, device)


def _install_clock(session: Session, spec: VariantSpec) -> ForwardClock | None:
    """Put a ForwardClock where the session's executors find their runner (None where this build
    keeps it elsewhere)."""
    assembly = session.executors
    if not hasattr(assembly, "runner"):
        return None
    deadline = (spec.spawned_at or _process_start()) + spec.budget_s
    clock = ForwardClock(assembly.runner, session.preset, session.device, deadline, per_forward=True,
                         profile_forwards=2 if spec.profile else 0)  # fmt: skip
    assembly.runner = clock
    return clock


def _profile_forwards(run, clock: ForwardClock) -> None:
    """The stream finished its blocks within the budget: profile the next block's first forwards."""
    clock.deadline = 0.0
    try:
        while True:  # a block may finish without a forward of its own (a segment's blocks finish together)
            next(run)
    except (BudgetSpent, StopIteration):
        pass


def _profile_block(run, marks: list[dict], spec: VariantSpec, rec: Recorder, device: torch.device) -> None:
    """One more block under the profiler, where the budget leaves time for it."""
    block_s = marks[-1]["denoise_s"] + marks[-1]["decode_s"]
    if _since_spawn(spec) + 2 * block_s > spec.budget_s:
        rec.update(profile_note="profile: skipped (budget)")
        return
    try:
        rec.update(**profiled_shares(lambda: next(run), device))
    except Exception as err:  # noqa: BLE001  (the split is extra: the timings above stand)
        rec.update(profile_note=f"profile: failed ({type(err).__name__}: {_first_line(err)})")


def _timed_block(run, decode: Decoder, device: torch.device) -> dict:
    start = time.perf_counter()
    block = next(run)
    sync(device)
    denoised = time.perf_counter()
    decode(block.latents)
    sync(device)
    stats = run.stats
    end = time.perf_counter()
    return {"denoise_s": denoised - start, "decode_s": end - denoised, "end": end, "forwards": stats.forwards,
            "calls": stats.calls.copy()}  # fmt: skip


def steady(preset: Preset, marks: list[dict], warmup: int) -> dict:
    """Steady-state numbers over the blocks after the warm-up (after the first block at least, when
    the budget cut the warm-up short); the first block's numbers are start-up."""
    first = max(1, min(warmup, len(marks) - 1))
    timed = marks[first:]
    if not timed:
        return {"timed_blocks": 0}
    before = marks[first - 1]
    denoise = sum(m["denoise_s"] for m in timed)
    decode = sum(m["decode_s"] for m in timed)
    frames = preset.pixel_frames(len(marks)) - preset.pixel_frames(first)
    forwards = timed[-1]["forwards"] - before["forwards"]
    flops = calls_flops(preset, timed[-1]["calls"], before["calls"])
    return {
        "warmup_blocks": first,
        "timed_blocks": len(timed),
        "fps": frames / denoise,
        "fps_decoded": frames / (denoise + decode),
        "forward_ms": 1000 * denoise / max(forwards, 1),
        "forwards_per_block": forwards / len(timed),
        "decode_ms": 1000 * decode / len(timed),
        "block_tflop": flops / len(timed) / 1e12,
        "tflops": flops / denoise / 1e12,
    }


def final_status(row: dict, spec: VariantSpec) -> str:
    """ok, or partial with what the budget left out."""
    if not (row.get("timed_blocks") or row.get("timed_forwards")):
        return "partial: no block after the first and no forward within the budget"
    if row.get("timed_blocks") and row["warmup_blocks"] < spec.warmup:
        return (f"partial: the budget cut the warm-up at block {row['warmup_blocks']} of {spec.warmup} "
                "(FPS includes start-up: compiles, a filling window)")  # fmt: skip
    return "ok"


def _since_spawn(spec: VariantSpec) -> float:
    return time.time() - (spec.spawned_at or _process_start())


def _process_start() -> float:
    """This process's start (epoch seconds), from /proc where there is one, else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def measure(spec: VariantSpec, rec: Recorder) -> None:
    """Every phase; the status says how the variant ended."""
    try:
        with torch.no_grad():
            session = build(spec, rec)
            stream(session, spec, rec)
        rec.update(status=final_status(rec.row, spec))
    except Unavailable as err:
        rec.update(status=str(err))
    except ConfigError as err:  # an option the config refuses for this preset or device
        rec.update(status=_refusal(spec, resolve_device(spec.device), err))
    except torch.cuda.OutOfMemoryError as err:
        rec.update(status=f"out of memory: {_first_line(err)}", peak_gib=_peak(resolve_device(spec.device)))
    except Exception as err:  # noqa: BLE001  (a compile or kernel failure is this variant's result)
        rec.update(status=f"failed: {type(err).__name__}: {_first_line(err)}", traceback=traceback.format_exc()[-4000:])


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    spec = VariantSpec(**json.loads(Path(spec_path).read_text()))
    rec = Recorder(Path(out_path), spec)
    rec.update(spec=asdict(spec))
    torch.set_grad_enabled(False)
    measure(spec, rec)
    return 0 if rec.row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
