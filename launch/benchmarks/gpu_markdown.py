"""The GPU report as Markdown: where it ran, the published anchors and the goal beside the
results, the analytic limits, the cascade model fed with the measured times, and each variant
that did not finish with its reason."""

from __future__ import annotations

from launch.throughput import ANCHOR_FPS, PUBLISHED_5_GPUS

GOAL = {"preset": "self-forcing-1.3b", "fps": 30.0, "first_frame_s": 0.3}
ANCHORS = {
    "published_one_h100_fps": ANCHOR_FPS,
    "block_cascading_five_gpus_fps": PUBLISHED_5_GPUS,
    "goal": GOAL,
}
CASCADE_COLUMNS = ["variant", "gpus", "split", "forward_ms", "decode_ms", "fps", "denoise_fps", "latency_s"]
LIMIT_COLUMNS = ["preset", "plan", "block_tflop", "fps_at_peak", "fps_at_700"]
KV_COLUMNS = ["preset", "kv_gib_bf16", "kv_gib_fp8"]
SMALL_CARD_COLUMNS = ["variant", "memory_cap", "options", "fps", "resident_fps", "vs_resident", "fps_model",
                      "bound", "h2d_gbps", "block_mb", "peak_gib", "note"]  # fmt: skip


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _environment(env: dict) -> list[str]:
    sdpa = ", ".join(f"{k}: {v}" for k, v in env["sdpa"].items())
    flash = ", ".join(f"{k}: {v or 'absent'}" for k, v in env["flash_attn"].items())
    packages = ", ".join(f"{k} {v or 'absent'}" for k, v in env["packages"].items())
    return [
        f"- card: **{env['card']}** ({env['device']}, compute capability {env['capability'] or '-'}), "
        f"torch {env['torch']}, CUDA {env['cuda'] or '-'}, Python {env['python']}",
        f"- command: `{env['command']}` ({env['date']})",
        f"- matmul peak: **{env['peak_tflops']:.3g} TFLOP/s** ({env['peak_matmul']})",
        f"- SDPA kernels: {sdpa}",
        f"- FlashAttention: {flash}",
        f"- packages: {packages}",
    ]


def _anchors() -> list[str]:
    one = ", ".join(f"{k} {v} FPS" for k, v in ANCHOR_FPS.items())
    five = ", ".join(f"{k} {v} FPS" for k, v in PUBLISHED_5_GPUS.items())
    return [
        f"- published, one H100: {one} (Self-Forcing 1.3B: 16-17 FPS)",
        f"- Block Cascading, five GPUs: {five}",
        f"- goal: {GOAL['preset']} >= {GOAL['fps']:.0f} FPS on one H100/H200, first frame <= {GOAL['first_frame_s']} s",
    ]


def verdicts(rows: list[dict]) -> list[str]:
    """Whether each variant of the goal's preset meets the goal (FPS and first frame)."""
    lines = []
    for row in rows:
        if row.get("preset") != GOAL["preset"] or not row.get("fps"):
            continue
        fps_ok, first_ok = row["fps"] >= GOAL["fps"], (row.get("first_frame_s") or 1e9) <= GOAL["first_frame_s"]
        lines.append(f"- {row['name']}: {row['fps']:.1f} FPS ({'meets' if fps_ok else 'below'} the goal), "
                     f"first frame {row.get('first_frame_s', float('nan')):.2f} s "
                     f"({'meets' if first_ok else 'above'} the goal)")  # fmt: skip
    return lines


def _not_ok(rows: list[dict]) -> list[str]:
    return [f"- {r['name']} ({r['preset']}): {r['status']}" for r in rows if r.get("status") != "ok"]


def _notes(rows: list[dict]) -> list[str]:
    keys = ("speed_line", "note", "decode_note", "profile_note")
    return [f"- {r['name']}: " + "; ".join(str(r[k]) for k in keys if r.get(k)) for r in rows
            if any(r.get(k) for k in keys)]  # fmt: skip


def render(report: dict, columns: list[str]) -> str:
    rows = report["variants"]
    parts = [
        f"# GPU report: {report['environment']['card']}",
        "",
        *_environment(report["environment"]),
        f"- whole run: {report['wall_s']:.0f} s",
        "",
        "## Anchors",
        "",
        *_anchors(),
        "",
        "## Results (random weights, real sizes; FPS of denoising, fps_decoded with the VAE; fps_est: the steady "
        "state at the achieved TFLOP/s)",
        "",
        table(rows, columns),
        "",
        *verdicts(rows),
        "",
        "## Analytic limit (steady state: every FLOP at the measured peak, or at 700 TFLOP/s dense bf16)",
        "",
        table(report["analytic_limits"], LIMIT_COLUMNS),
        "",
        "## KV cache of one stream (GiB; bf16 and fp8 storage)",
        "",
        table(report["kv_memory"], KV_COLUMNS),
        "",
        "## Cascade throughput model, fed with the measured forward and decode times (modelled, NVLink)",
        "",
        table(report["cascade_model"], CASCADE_COLUMNS),
        "",
        "## Smaller cards: memory-capped variants, and the offload model's FPS from the resident forward "
        "(launch/throughput.py offload_fps)",
        "",
        table(report.get("offload_model", []), SMALL_CARD_COLUMNS),
        "",
        "## Variants that did not finish",
        "",
        *(_not_ok(rows) or ["- none"]),
        "",
        "## Notes",
        "",
        *(_notes(rows) or ["- none"]),
        *[f"- the {name} part failed: {why}" for name, why in report.get("errors", {}).items()],
    ]
    return "\n".join(parts) + "\n"
