"""How much memory the device has free, and how sizes are said and read.

The memory plan (launch/memory.py) counts every part of a run on the meta device and compares the
peak with `available_bytes`: a preset too big for the machine is refused in one line before
anything is allocated, instead of swapping for minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

GIB = 2**30
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")
# cgroup v2, then v1: (limit, usage). A container's limit can be far below the host's free RAM.
CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


UNITS = {"b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": GIB, "gb": 10**9, "gib": GIB, "t": 2**40, "tb": 10**12, "tib": 2**40}  # fmt: skip
"""Memory sizes: KiB/MiB/GiB/TiB and bare K/M/G/T are powers of 2, kB/MB/GB/TB powers of 10."""


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB' (10^9), '24G' (GiB), '512MiB' -> bytes (an argparse type)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = found and found.group(2).lower()
    if not found or unit not in UNITS or float(found.group(1)) <= 0:  # a bare number too: bytes or GiB?
        raise ValueError(f"{text!r} is not a memory size with a unit: write e.g. 24GiB, 24GB or 512MiB")
    return int(float(found.group(1)) * UNITS[unit])


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def available_bytes(device: torch.device, meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> int | None:
    """Free memory on `device`: CUDA's free bytes, or for the CPU MemAvailable capped by the
    cgroup's headroom. None when unknown (no /proc, another accelerator): then nothing is refused."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = [b for b in (_meminfo_available(meminfo), _cgroup_headroom(cgroup)) if b is not None]
    return min(free) if free else None


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: Path) -> int | None:
    for limit_name, usage_name in CGROUP_FILES:
        try:
            limit = (root / limit_name).read_text().strip()
            usage = int((root / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" / a near-2^63 v1 value: no limit
            return max(int(limit) - usage, 0)
    return None
