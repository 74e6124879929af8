"""The GPU report end to end on a CPU, with each preset's tiny stand-in (GPU numbers need a GPU).

pytest tests/launch/test_gpu_report.py

One run of `launch.bench gpu-report --tiny` with a failure injected into one variant: every
variant is in the JSON with its fields, the failure is recorded and the variants after it still
run, CUDA graphs are refused as CUDA only, the compiled and fp8-KV variants really ran, the
throughput model got the measured forward and decode times, and the Markdown table renders.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.families import forward_flops
from launch import bench
from launch.benchmarks.forward_clock import BudgetSpent, ForwardClock
from launch.benchmarks.gpu_report import COLUMNS, VARIANTS, analytic_limits, run_variant
from launch.benchmarks.gpu_variant import VariantSpec, final_status, steady
from launch.benchmarks.plan_flops import counted_block_flops
from launch.benchmarks.timing import steady_block_flops
from launch.presets import get_preset
from launch.throughput import HOST_LINKS, offload_forward_s

MEASURED = ["fps", "fps_est", "fps_decoded", "first_frame_s", "startup_s", "build_s", "forward_ms", "decode_ms",
            "tflops", "mfu", "block_tflop", "analytic_block_tflop", "limit_fps_peak", "limit_fps_700", "attention",
            "linear", "rest", "kv_gib"]  # fmt: skip
RAN = ["sf-eager", "sf-compiled", "magi-eager", "skyreels-eager", "sf-eager-fp8kv", "ll2-eager", "sf-12gb",
       "wan14b-32gb"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu-report")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker pool on 2 shared cores
    argv = ["gpu-report", "--tiny", "--device", "cpu", "--blocks", "2", "--out", str(out), "--json",
            str(out / "bench.json"), "--inject-failure", "wan14b-eager", "--budget-s", "400",
            "--deadline-s", "1500"]  # fmt: skip
    assert bench.main(argv) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), out


@pytest.mark.timeout(1800)
def test_every_variant_reports_its_fields(report):
    data, _, out = report
    rows = {row["name"]: row for row in data["variants"]}
    assert list(rows) == [v.name for v in VARIANTS]
    for name in RAN:
        row = rows[name]
        assert row["status"] == "ok", (name, row["status"], row.get("log_tail"))
        missing = [k for k in MEASURED if row.get(k) is None]
        assert not missing, (name, missing)
        assert row["fps"] > 0 and row["fps_decoded"] < row["fps"] and row["forward_ms"] > 0, row
        assert row["startup_s"] >= row["first_frame_s"] > 0, row
        assert math.isclose(row["attention"] + row["linear"] + row["rest"], 1.0, rel_tol=1e-6), row
        assert row["limit_fps_peak"] > row["fps"] * 0.99, row  # nothing runs faster than its FLOPs at the peak
    for name in ("magi-eager", "skyreels-eager"):  # blocks of minutes at real size: timed forward by forward
        assert rows[name]["timed_forwards"] > 0, rows[name]
    assert data["environment"]["peak_tflops"] > 0 and data["environment"]["sdpa"]["math"] == "ok"
    assert data["errors"] == {}, data["errors"]
    assert json.loads((out / "bench.json").read_text())["benchmark"] == "gpu-report"


@pytest.mark.timeout(1800)
def test_speed_options_ran_for_real(report):
    rows = {row["name"]: row for row in report[0]["variants"]}
    assert "compiled" in rows["sf-compiled"]["speed_line"], rows["sf-compiled"]["speed_line"]
    assert "KV cache: fp8" in rows["sf-eager-fp8kv"]["speed_line"], rows["sf-eager-fp8kv"]["speed_line"]
    assert rows["sf-eager-fp8kv"]["kv_gib"] != rows["sf-eager"]["kv_gib"]  # another storage, another size
    assert rows["sf-graphs"]["status"].startswith("CUDA only:"), rows["sf-graphs"]["status"]


@pytest.mark.timeout(1800)
def test_smaller_cards_stream_their_blocks_and_meet_the_offload_model(report):
    """The memory-capped variants ran with their options (the cap itself is CUDA's: said, not
    applied, on a CPU), copied blocks, and the offload model predicted their FPS from the resident
    variant's forward; a CPU has no host link to model, so nothing is asserted of the ratio."""
    data = report[0]
    rows = {row["name"]: row for row in data["variants"]}
    for name, options in (("sf-12gb", "offload: 1 of 2"), ("wan14b-32gb", "weights: fp8 (arcade e4m3)")):
        row = rows[name]
        assert options in row["speed_line"] and "text encoder: on the host" in row["speed_line"], row["speed_line"]
        assert "cap not applied" in row["memory_cap"] and row["copies"] > 0 and row["block_mb"] > 0, row
    model = {m["variant"]: m for m in data["offload_model"]}
    assert set(model) == {"sf-12gb", "wan14b-32gb"}, data["offload_model"]
    one = model["sf-12gb"]
    assert one["fps_model"] > 0 and one["resident_fps"] > 0 and one["bound"] in ("copy", "compute"), one
    assert model["wan14b-32gb"]["note"] == "no prediction: wan14b-eager measured no forward"  # the injected failure
    assert "--weights fp8 --offload layers --kv-cache fp8" in model["wan14b-32gb"]["options"]
    assert rows["wan14b-32gb"]["block_mb"] < rows["sf-12gb"]["block_mb"]  # the same tiny model, fp8 blocks
    assert "--vae-dtype bfloat16" in model["sf-12gb"]["options"], model["sf-12gb"]  # what makes 1.3B fit 12 GiB
    assert "## Smaller cards" in report[1]


def test_offload_model_formula():
    """t = resident c + (L - resident) max(c, m): compute-bound when a block copies faster than it
    computes (self-forcing-1.3b on PCIe 5), copy-bound otherwise (wan-14b-causal bf16 on PCIe 4)."""
    fast = offload_forward_s(0.150, 30, 93e6, HOST_LINKS["pcie5"])
    assert fast.bound == "compute" and fast.forward_s == pytest.approx(0.150)
    slow = offload_forward_s(0.533, 40, 703e6, HOST_LINKS["pcie4"])
    assert slow.bound == "copy" and slow.forward_s == pytest.approx(0.533 / 40 + 39 * 703e6 / 25e9)


@pytest.mark.timeout(1800)
def test_one_failure_stops_no_other(report):
    rows = {row["name"]: row for row in report[0]["variants"]}
    assert rows["wan14b-eager"]["status"].startswith("failed: RuntimeError: injected failure"), rows["wan14b-eager"]
    assert rows["wan14b-eager"]["build_s"] > 0  # it failed after building, as injected
    assert "injected failure" in report[1]


@pytest.mark.timeout(1800)
def test_steady_state_flops_match_the_analytic_count(report):
    """Timed blocks of a sequential plan are steady (the window has slid): the FLOPs of the forwards
    they ran, counted from the run's calls, equal the preset's analytic steady-state count."""
    row = next(r for r in report[0]["variants"] if r["name"] == "sf-eager")
    assert row["warmup_blocks"] == 3 and row["timed_blocks"] == 2, row
    assert math.isclose(row["block_tflop"], row["analytic_block_tflop"], rel_tol=1e-9), row
    assert row["forwards_per_block"] == 5, row


@pytest.mark.timeout(1800)
def test_throughput_model_received_the_measured_times(report):
    data = report[0]
    rows = {row["name"]: row for row in data["variants"]}
    model = [m for m in data["cascade_model"] if m["variant"] == "sf-eager"]
    assert {m["gpus"] for m in model} == {1, 5}, data["cascade_model"]
    one = next(m for m in model if m["gpus"] == 1)
    measured = rows["sf-eager"]
    assert one["forward_ms"] == pytest.approx(measured["forward_ms"]) and one["decode_ms"] == measured["decode_ms"]
    preset = get_preset("tiny-wan")
    period = (preset.sampling.steps + 1) * measured["forward_ms"] / 1000 + measured["decode_ms"] / 1000
    assert one["fps"] == pytest.approx(12 / period, rel=1e-6), (one, period)
    assert {m["variant"] for m in data["cascade_model"]} == {"sf-eager", "sf-compiled", "sf-eager-fp8kv", "ll2-eager"}


@pytest.mark.timeout(1800)
def test_markdown_table_renders(report):
    md = report[1]
    lines = md.splitlines()
    header = "| " + " | ".join(COLUMNS) + " |"
    at = lines.index(header)
    assert lines[at + 1] == "|" + "---|" * len(COLUMNS)
    body = lines[at + 2 : at + 2 + len(VARIANTS)]
    assert [line.split(" | ")[0].removeprefix("| ") for line in body] == [v.name for v in VARIANTS]
    assert all(line.count(" | ") == len(COLUMNS) - 1 for line in body), body
    for anchor in ("16.5 FPS", "30.0 FPS", "12.5 FPS", "first frame <= 0.3 s", "torch ", "command: `"):
        assert anchor in md, anchor


def test_analytic_limit_of_self_forcing():
    """5 forwards of a 4,680-token block against 21 frames of context: about 40 FPS at 700 TFLOP/s."""
    limit = analytic_limits(["self-forcing-1.3b"])[0]
    assert limit["plan"] == "sequential"
    preset = get_preset("self-forcing-1.3b")
    forward = forward_flops(preset.model, 3 * 1560, 21 * 1560, 512)
    assert limit["block_tflop"] == pytest.approx(5 * forward / 1e12)
    assert 38 < limit["fps_at_700"] < 45, limit


def test_stand_in_counts_the_real_plans_forwards():
    """A 2-layer stand-in at 64x64 makes the real plan's calls: its count of a sequential plan's
    steady blocks (the window slid) equals the closed form."""
    preset = get_preset("self-forcing-1.3b")
    counted = counted_block_flops(preset, 9)
    assert counted[7:] == [steady_block_flops(preset)] * 2, counted
    assert counted[0] < counted[7]  # the first block sees no context


def test_forward_clock_times_profiles_and_stops():
    preset = get_preset("tiny-wan")
    view = SimpleNamespace(key_frames=6)
    weight = torch.randn(8, 8)
    clock = ForwardClock(lambda x, *a, **k: x @ weight, preset, torch.device("cpu"), deadline=float("inf"),
                         per_forward=True, profile_forwards=2)  # fmt: skip
    latents = torch.zeros(2, 4, 3, 8, 8)  # 2 guidance rows of 3 query frames
    for _ in range(4):
        clock(latents, None, None, view)
    clock.deadline = 0.0  # the budget is spent: 2 profiled forwards, then the stream stops
    clock(latents, None, None, view)
    clock(latents, None, None, view)
    with pytest.raises(BudgetSpent):
        clock(latents, None, None, view)
    assert len(clock.forwards) == 6 and clock.shares["linear"] > 0.5, clock.shares
    summary = clock.summary(after=None)
    assert summary["timed_forwards"] == 1  # the later half of 6, less the 2 profiled
    flops = 2 * forward_flops(preset.model, 3 * preset.tokens_per_frame, 6 * preset.tokens_per_frame, 16)
    assert clock.forwards[0][2] == flops


def test_a_warmup_cut_by_the_budget_is_not_called_steady():
    preset = get_preset("tiny-wan")
    calls = [Counter({(3, 3): 5}), Counter({(3, 3): 5, (3, 6): 5})]  # RunStats.calls after blocks 0 and 1
    marks = [{"denoise_s": 0.5, "decode_s": 0.1, "end": i, "forwards": 5 * (i + 1), "calls": c}
             for i, c in enumerate(calls)]  # fmt: skip
    row = steady(preset, marks, warmup=3)
    assert row["warmup_blocks"] == 1 and row["timed_blocks"] == 1 and row["forwards_per_block"] == 5
    spec = VariantSpec(name="cut", preset="tiny-wan", warmup=3)
    assert final_status(row, spec).startswith("partial: the budget cut the warm-up at block 1 of 3"), final_status(
        row, spec
    )
    assert final_status(steady(preset, marks, warmup=1), dataclasses.replace(spec, warmup=1)) == "ok"


def test_a_variant_past_its_time_is_killed_with_its_processes(tmp_path):
    spec = VariantSpec(name="slow", preset="tiny-wan", device="cpu")
    row = run_variant(spec, hard_s=1.0, folder=tmp_path)  # the child is still importing torch
    assert row["status"].startswith("timed out"), row
    marker = str(tmp_path / "slow.spec.json").encode()
    alive = [p for p in Path("/proc").glob("[0-9]*") if marker in _cmdline(p)]
    assert not alive, alive


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blocks", "0"], "--blocks must be at least 1"),
        (["--variants", "sf-eager", "--inject-failure", "magi-eager"], "not among the variants run"),
        (["--quick", "--inject-failure", "magi-eager"], "--quick runs sf-eager alone"),
    ],
)
def test_mistakes_are_one_line(argv, message, capsys, tmp_path):
    assert bench.main(["gpu-report", "--tiny", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
