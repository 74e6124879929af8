"""What a pipeline is about to allocate, and how much memory the device has free for it.

The transformer is counted on the meta device and the KV cache measured there too, before anything
is allocated: a preset too big for the machine is refused in one line instead of swapping for
minutes. The figure is a lower bound (activations, the text encoder and the VAE come on top), so
a refusal is certain and a pass is not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")
# cgroup v2, then v1: (limit, usage). A container's limit can be far below the host's free RAM.
CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


@dataclass(frozen=True)
class Footprint:
    """Bytes the transformer and one stream's KV cache take on the device."""

    params: int
    dtype: torch.dtype
    kv_bytes: int
    random_init: bool

    @property
    def weight_bytes(self) -> int:
        """At the run dtype (the few float32-kept norms are left out: a lower bound)."""
        return self.params * self.dtype.itemsize

    @property
    def needed(self) -> int:
        # random weights are drawn in float32, then cast: the float32 copy is the peak
        init = self.params * 4 if self.random_init else 0
        return max(self.weight_bytes, init) + self.kv_bytes

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        kv = f" + KV cache {size(self.kv_bytes)}" if self.kv_bytes else ""
        init = ", drawn in float32" if self.random_init and self.dtype.itemsize < 4 else ""
        weights = f"{count(self.params)} parameters ({size(self.weight_bytes)} at {dtype}{init})"
        return f"{weights}{kv} = at least {size(self.needed)}"


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


def too_big_hint(device: torch.device, dtype: torch.dtype) -> str:
    """What to try instead, for the device at hand."""
    tips = []
    if dtype.itemsize == 4:
        tips.append("--dtype bfloat16 (half the bytes)")
    tips.append("a smaller preset (sizes: python -m launch.presets --counts)")
    tips.append("a GPU (--device cuda)" if device.type == "cpu" else "a device with more free memory")
    return "try " + ", ".join(tips)
