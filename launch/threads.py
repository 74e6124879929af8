"""CPU threads: a policy that degrades gracefully when the cores are shared.

Torch's OpenMP threads spin while they wait for work. On a machine whose cores something else
also uses, a spinning thread takes a core from the process that needs it: the demo ran 8x slower
with one busy neighbour on 2 cores (72 s instead of 9 s for the quick start). So:
* the wait policy is passive unless the user chose one (`OMP_WAIT_POLICY`; set in
  launch/__init__.py, before torch loads its OpenMP runtime);
* a small model on the CPU runs on one thread: its forward is dominated by per-call overhead,
  which more threads do not shrink, and one thread cannot be starved by a neighbour;
* `--threads N` overrides both choices of thread count.
"""

from __future__ import annotations

import logging

import torch

SMALL_MODEL_PARAMS = 50_000_000
"""Below this a CPU forward is overhead-bound: one thread is as fast and never contended."""

log = logging.getLogger(__name__)


def configure_threads(requested: int | None, model: torch.nn.Module, device: torch.device) -> int:
    """Set torch's intra-op threads for this process; returns the number chosen."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
    elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)
    threads = torch.get_num_threads()
    log.info("CPU threads: %d (%s)", threads, "--threads" if requested else "small model on the CPU: 1")
    return threads
