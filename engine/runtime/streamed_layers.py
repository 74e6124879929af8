"""Transformer blocks kept in host memory, each copied to the device while the one before computes.

`--offload layers` replaces the model's block list by a `StreamedBlocks`: the same modules, whose
parameters (and buffers) live in host memory (pinned, on CUDA) and are bound, for the time a block
computes, to one of two device-resident slots. The model's own loops (`for block in self.blocks`,
in the forward and in `embed_text`) drive it: iterating the list is what streams it. When block i
is handed out, the copy of block i+1 into the other slot is queued on a side stream, behind an
event saying block i-1 (the slot's last reader) has finished; block i's kernels wait for its own
copy's event. The forward runs the same kernels on the same values as a resident one, so the
output is bit-equal (tests: tiny-wan and the demo).

Between its turns a streamed block's parameters are bound to meta tensors: a computation that
reached one outside the iteration would fail loudly, not silently read host memory. The first
`resident` blocks stay on the device: `model.blocks[0]` is what the feature caches probe
(engine/families/), and the copy of the first streamed block then overlaps block 0's compute.
On a CPU the "device" is the CPU: the slots are separate tensors and the copies plain `copy_`s,
which is how the tests check the mechanism (`copies` counts them).

Why not accelerate's hooks: `cpu_offload_with_hook` moves a whole model on and off the device (the
model, not its layers), and `AlignDevicesHook` (accelerate 1.16) copies a module's weights in its
pre-forward hook on the compute stream, from unpinned host tensors, without prefetching the next
module, so every copy stalls the GPU; it also allocates the device copies anew per call. Here the
copies overlap compute and the device memory is two fixed slots.

Time per forward (launch/throughput.py, `offload_forward_s`): with c the compute of one block (the
resident forward / L) and m = block bytes / host-to-device bandwidth, about
resident * c + (L - resident) * max(c, m).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ConfigError


class StreamedBlocks(nn.ModuleList):
    """`blocks` with all but the first `resident` kept in host memory and streamed through two slots."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, resident: int = 1):
        super().__init__(list(blocks))
        self.device, self.resident = torch.device(device), min(resident, len(blocks))
        self.copies = 0
        """Blocks copied to the device so far."""
        streamed = list(self._modules.values())[self.resident :]
        self._entries = [_entries(block) for block in streamed]
        self._host = [[self._to_host(t) for t in _tensors(e)] for e in self._entries]
        _check_alike(self._host)
        first = self._host[0] if streamed else []
        self._slots = [[torch.empty_like(t, device=self.device) for t in first] for _ in range(2)]
        for entries in self._entries:
            _bind(entries, [torch.empty_like(t, device="meta") for t in _tensors(entries)])
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event(), torch.cuda.Event()]
            self._free = [torch.cuda.Event(), torch.cuda.Event()]
        self._next: tuple[int, int] | None = None  # (block, slot) whose copy is queued
        self._computing: int | None = None  # the slot of the block handed out

    @property
    def slot_bytes(self) -> int:
        """Device bytes of the two slots."""
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self._host for t in tensors)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().to("cpu")
        return host.pin_memory() if self.device.type == "cuda" else host

    def __iter__(self):
        blocks = list(self._modules.values())
        if self.resident == 0:
            self._prefetch(0)
        for index, block in enumerate(blocks):
            if index < self.resident:
                if index == self.resident - 1:
                    self._prefetch(self.resident)  # overlaps the last resident block's compute
                yield block
                continue
            self._arrive(index)
            self._prefetch(index + 1 if index + 1 < len(blocks) else self.resident)  # the next forward's first
            try:
                yield block
            finally:
                self._leave(index)

    def _prefetch(self, index: int) -> None:
        """Queue block `index`'s copy into the slot the computing block does not hold."""
        if index >= len(self) or (self._next is not None and self._next[0] == index):
            return
        if self._computing is not None:
            slot = 1 - self._computing
        else:
            slot = self._next[1] if self._next is not None else 0
        host, target = self._host[index - self.resident], self._slots[slot]
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._free[slot])  # the slot's last reader has finished
                for dst, src in zip(target, host):
                    dst.copy_(src, non_blocking=True)
                self._ready[slot].record(self._copy_stream)
        else:
            for dst, src in zip(target, host):
                dst.copy_(src)
        self.copies += 1
        self._next = (index, slot)

    def _arrive(self, index: int) -> None:
        if self._next is None or self._next[0] != index:  # an iteration left early: fetch it now
            self._prefetch(index)
        _, slot = self._next
        self._next = None
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        _bind(self._entries[index - self.resident], self._slots[slot])
        self._computing = slot

    def _leave(self, index: int) -> None:
        slot = self._computing
        if self._cuda:
            self._free[slot].record(torch.cuda.current_stream(self.device))
        entries = self._entries[index - self.resident]
        _bind(entries, [torch.empty_like(t, device="meta") for t in _tensors(entries)])
        self._computing = None


def stream_blocks(model: nn.Module, device: torch.device, resident: int = 1) -> StreamedBlocks:
    """Install `StreamedBlocks` in place of `model.blocks` (a module list, or a property naming
    one) and move everything else to `device`."""
    blocks = model.blocks
    owner, attribute = _owner_of(model, blocks)
    streamed = StreamedBlocks(blocks, device, resident)
    setattr(owner, attribute, streamed)
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta and t.device != torch.device(device):
            t.data = t.data.to(device)
    return streamed


def _owner_of(model: nn.Module, blocks: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        if module is blocks:
            parent, _, attribute = name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), attribute
    raise ConfigError("--offload layers: this model has no block list to stream")


Entry = tuple[nn.Module, str, bool]
"""(module, name, is_parameter): one tensor of a block, as it is bound."""


def _entries(block: nn.Module) -> list[Entry]:
    found = []
    for module in block.modules():
        found += [(module, name, True) for name, p in module._parameters.items() if p is not None]
        found += [(module, name, False) for name, b in module._buffers.items() if b is not None]
    return found


def _tensors(entries: list[Entry]) -> list[torch.Tensor]:
    return [(m._parameters if is_param else m._buffers)[name] for m, name, is_param in entries]


def _bind(entries: list[Entry], tensors: list[torch.Tensor]) -> None:
    for (module, name, is_param), tensor in zip(entries, tensors):
        if is_param:  # a new Parameter: .data cannot move a parameter to or from the meta device
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor


def _check_alike(hosts: list[list[torch.Tensor]]) -> None:
    """Two slots serve every streamed block only if the blocks hold the same tensors."""
    first = [(t.shape, t.dtype) for t in hosts[0]] if hosts else []
    for tensors in hosts[1:]:
        if [(t.shape, t.dtype) for t in tensors] != first:
            raise ConfigError("--offload layers needs blocks of one shape; this model's blocks differ")
