"""One stream's device state to host memory and back: what suspending a stream moves.

A stream's state is whatever its executor and parts hold for it alone: the KV cache's buffers
(every tensor attribute, whatever the cache stores: keys, values, sink copies, scales), noisy
and clean latents, in-flight K/V, the solver's history, the cache policy's kept outputs and
indicators, the switch part's history. It is found by walking those objects: dicts, lists,
tuples and the attributes of objects of this project's runtime, sampling and cache code.
What belongs to the model side is shared by every stream and is not walked: weights (torch
modules), rotary tables and prompt K/V (engine.models), the plan's schedule (engine.plan).

Moving is in place (containers and attributes are rebound to the moved tensors); a tensor reached
twice is moved once and stays one tensor. To the host the copy is always fresh (pinned when the
source is on a GPU), so the device copies are freed once nothing else holds them.
"""

from __future__ import annotations

import dataclasses

import torch

WALKED = ("engine.runtime.", "engine.sampling.", "cache.")
"""Modules whose objects hold per-stream state."""
SHARED = ("engine.runtime.placement", "engine.runtime.sharding")
"""Runtime objects that reach shared, process-wide things (process groups, other ranks)."""


def state_tensors(roots: list) -> list[torch.Tensor]:
    """Every distinct tensor reachable from `roots` (what `relocate` would move)."""
    walker = _Walker(lambda t: t)
    walker.value(roots)
    return list(walker.done.values())


def relocate(roots: list, device: torch.device) -> int:
    """Move every tensor reachable from `roots` to `device`, in place; bytes moved."""
    device = torch.device(device)
    walker = _Walker(lambda t: _to_host(t) if device.type == "cpu" else t.to(device, non_blocking=True))
    walker.value(roots)
    if any(t.is_cuda for t in walker.done.values()) or device.type == "cuda":
        torch.cuda.synchronize()  # host copies are complete, device copies in place, before anyone reads
    return sum(t.numel() * t.element_size() for t in walker.done.values())


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    return host.copy_(t, non_blocking=t.is_cuda)


class _Walker:
    def __init__(self, move):
        self.move = move
        self.done: dict[int, torch.Tensor] = {}  # id(source tensor) -> moved tensor
        self.seen: set[int] = set()

    def value(self, v):
        """`v` with its tensors moved: containers and objects in place, tensors and tuples anew."""
        if isinstance(v, torch.Tensor):
            if id(v) not in self.done:
                self.done[id(v)] = self.move(v)
            return self.done[id(v)]
        if isinstance(v, tuple) and type(v) is tuple:
            return tuple(self.value(x) for x in v)
        if id(v) in self.seen:
            return v
        self.seen.add(id(v))
        if isinstance(v, dict):
            for key in v:
                v[key] = self.value(v[key])
        elif isinstance(v, list):
            v[:] = [self.value(x) for x in v]
        elif _walked(v):
            self._attributes(v)
        return v

    def _attributes(self, obj) -> None:
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
        for name in names:
            old = getattr(obj, name)
            new = self.value(old)
            if new is not old:
                object.__setattr__(obj, name, new)  # frozen dataclasses too


def _walked(obj) -> bool:
    module = type(obj).__module__ + "."
    return hasattr(obj, "__dict__") and module.startswith(WALKED) and not module.startswith(SHARED)
