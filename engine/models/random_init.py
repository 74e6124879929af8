"""Seeded random weights for any network (timing runs, smoke tests, the demo's training start).

Shaped like PyTorch's defaults, drawn parameter by parameter with one generator, so the same seed
gives the same weights on any device. Families with their own norms adjust after this
(engine/families/magi.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import torch

from engine.footprint import count

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 50_000_000  # random weights below this size are drawn on the CPU


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights shaped like PyTorch's defaults: U(+-1/sqrt(fan_in)), norms 1, modulation N/sqrt(dim)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in _with_progress(model.named_parameters()):
        if "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif "modulation" in name:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
        else:
            fan_in = param[0].numel() if param.dim() > 1 else param.numel()
            bound = fan_in**-0.5
            param.uniform_(-bound, bound, generator=generator)


def _with_progress(named: Iterable[tuple[str, torch.Tensor]], steps: int = 10) -> Iterator[tuple[str, torch.Tensor]]:
    """`named`, logging every 1/steps of the parameters for big models (minutes on a CPU)."""
    named = list(named)
    total = sum(p.numel() for _, p in named)
    if total < SMALL_MODEL_PARAMS:
        yield from named
        return
    done, reported, start = 0, 0, time.perf_counter()
    for name, param in named:
        yield name, param
        done += param.numel()
        if done * steps >= (reported + 1) * total:
            reported = done * steps // total
            elapsed = time.perf_counter() - start
            log.info("random weights: %d%% of %s parameters (%.0f s)", 100 * done // total, count(total), elapsed)
