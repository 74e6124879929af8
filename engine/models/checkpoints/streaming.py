"""Checkpoints loaded tensor by tensor, straight to the target device and dtype.

A checkpoint is first opened, not read: each tensor of a .safetensors file is an `Entry` known by
its header (shape, dtype, file), so keys, shapes and dtypes are checked against the model before
any value is read. `stream_into` then takes the tensors one at a time: read (a view of the file,
released once placed), value-checked, moved to the device in the stored dtype, optionally edited
(LoRA merge), cast and assigned to the meta model's parameter. Host memory beyond the model is
about one tensor (one file for torch files, one shard for MAGI-1's .zst shards), where reading
whole shards into a state dict and then moving and casting the model needed the whole checkpoint
on the host. A tensor loaded to the CPU in its stored dtype stays a view of the file: its pages
are the model's memory, shared with the page cache, as with torch.load(mmap=True).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open

from engine.models.checkpoints.validate import HEADER_DTYPES, CheckpointError, first_line, first_problem

DTYPE_SOURCES = ("file", "model")
Edit = Callable[[str, torch.Tensor], torch.Tensor]
"""(key, tensor on the device in its stored dtype) -> the tensor to load (any float dtype)."""


@dataclass(frozen=True)
class Entry:
    """A tensor of a checkpoint file, not read yet: what its header says, and how to read it."""

    shape: torch.Size
    dtype: torch.dtype
    file: Path
    read: Callable[[], torch.Tensor]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()


Stored = Union[torch.Tensor, Entry]
"""A checkpoint's value: a tensor already in memory (or mapped), or an entry read on demand."""


def value_of(stored: Stored) -> torch.Tensor:
    return stored.read() if isinstance(stored, Entry) else stored


def unreadable_safetensors(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read safetensors file ({first_line(err)}); the file is damaged or not "
        "safetensors: download it again"
    )


def _read_one(path: Path, key: str) -> torch.Tensor:
    """Tensor `key` of `path` as a view of the file (the mapping goes when the tensor does)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    except Exception as err:  # the file changed or broke since it was opened
        raise unreadable_safetensors(path, err) from err


def safetensors_entries(path: Path) -> dict[str, Entry]:
    """Every tensor of a .safetensors file as an `Entry`, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = {}
            for key in f.keys():
                part = f.get_slice(key)
                dtype = HEADER_DTYPES.get(part.get_dtype()) or f.get_tensor(key).dtype  # rare codes: ask torch
                entries[key] = Entry(torch.Size(part.get_shape()), dtype, path, partial(_read_one, path, key))
            return entries
    except Exception as err:  # safetensors raises its own error types for truncation/corruption
        raise unreadable_safetensors(path, err) from err


# -- placing tensors into a meta model ------------------------------------------------------------


def _assign(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `key` (on the meta device) by `value`."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, name)
    if isinstance(old, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(owner, name, value)


@torch.no_grad()
def stream_into(
    model: torch.nn.Module,
    state: Mapping[str, Stored],
    *,
    where: Callable[[str], Path],
    device: torch.device | str = "cpu",
    dtypes: str = "file",
    file_keys: Mapping[str, str] | None = None,
    edit: Edit | None = None,
) -> None:
    """Load `state` (already checked to fit: keys, shapes, dtypes) into `model` one tensor at a
    time. Each value is checked (finite) on the device before it is cast; a bad one raises
    CheckpointError naming its file (`where(stored key)` for values that are not entries).
    `dtypes`: "file" keeps each tensor's stored dtype, "model" gives it the dtype of the parameter
    it replaces (cast the meta model first, e.g. `model.cast(torch.bfloat16)`). `edit(key, tensor)`
    changes a tensor on the device before its cast (LoRA merging)."""
    if dtypes not in DTYPE_SOURCES:
        raise ValueError(f"dtypes must be one of {DTYPE_SOURCES}, got {dtypes!r}")
    device = torch.device(device)
    targets = {key: value.dtype for key, value in model.state_dict().items()} if dtypes == "model" else {}
    for key, stored in state.items():
        host = value_of(stored)  # often a view of the file: its pages are read as it is moved
        value = host.to(device)  # the stored bytes cross, not a cast copy
        found = first_problem({key: value}, file_keys=file_keys)
        if found is not None:
            raise CheckpointError(f"{stored.file if isinstance(stored, Entry) else where(found[0])}: {found[1]}")
        if edit is not None:
            value = edit(key, value)
        _assign(model, key, value.to(targets.get(key, host.dtype)))
        del host, value  # before the next tensor is read
