"""Benchmark output: an aligned text table on stdout and a JSON file with the run's context."""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def environment() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python -m launch.bench " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }


def write_json(path: Path, name: str, rows: list[dict], settings: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()} for row in rows]
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), "settings": settings, "rows": clean}, indent=2)
    )
