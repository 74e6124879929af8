"""The value check every loaded state dict passes: floating-point tensors with finite values.

Shapes and keys are checked against the model by `wan.check_fit`; this module checks what shapes
cannot show. An int8 export of the right shapes, or weights from a diverged run, would otherwise
load silently and fail deep inside a forward (or render noise). Each failure is one line naming the
file, the key and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_NAMES = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES[:3])
# safetensors header codes (format spec) of the dtypes a message can name in torch terms
HEADER_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "C64": torch.complex64,
}  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_hint(dtype: torch.dtype) -> str:
    if dtype in FP8_DTYPES:
        return "fp8 weights load only from MAGI-1's fp8 release, where each has a weight_scale"
    if dtype.is_floating_point:
        return f"convert it to one of {_NAMES}"
    if dtype.is_complex or dtype == torch.bool:
        return "this is not a weight tensor; check that the file is a model checkpoint"
    return "an integer-quantised export cannot be loaded: use the unquantised (bf16 or fp32) release"


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf. aminmax propagates NaN and shows +-inf, and is ~10x faster than isfinite()."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _more(count: int) -> str:
    return f" (+{count} more)" if count else ""


def check_tensors(
    state: Mapping[str, torch.Tensor], source: str | Path, *, file_keys: Mapping[str, str] | None = None
) -> None:
    """Raise CheckpointError unless every value is a floating-point tensor with finite values.

    `source`: the file (or folder) named in the message; `file_keys`: our key -> the key as stored
    in the file, so the message names what the user can find in it.
    """
    found = first_problem(state, file_keys=file_keys)
    if found is not None:
        raise CheckpointError(f"{source}: {found[1]}")


def _tensor_like(value) -> bool:
    """A tensor, or a checkpoint entry not read yet (streaming.Entry: its header's dtype)."""
    return isinstance(value, torch.Tensor) or isinstance(getattr(value, "dtype", None), torch.dtype)


def first_problem(
    state: Mapping[str, torch.Tensor], *, file_keys: Mapping[str, str] | None = None, values: bool = True
) -> tuple[str, str] | None:
    """(stored key, what is wrong and what to do) for the first bad value, else None. Dtypes are
    checked for every tensor before any value is read: a wrong dtype is found without a pass.
    `values=False`: dtypes only (entries not read yet; their values are checked as they load)."""
    stored = (lambda key: file_keys.get(key, key)) if file_keys else (lambda key: key)
    odd = [k for k, v in state.items() if not _tensor_like(v)]
    if odd:
        return stored(odd[0]), f"entry {stored(odd[0])} is not a tensor{_more(len(odd) - 1)}"
    wrong = [k for k, v in state.items() if v.dtype not in FLOAT_DTYPES]
    if wrong:
        key, dtype = stored(wrong[0]), state[wrong[0]].dtype
        more = _more(len(wrong) - 1)
        return key, f"tensor {key} is {_name(dtype)}, not {_NAMES}{more}; {_dtype_hint(dtype)}"
    if not values:
        return None
    bad = [k for k, v in state.items() if not is_finite(v)]
    if bad:
        key, tensor = stored(bad[0]), state[bad[0]]
        count = int((~torch.isfinite(tensor)).sum())
        return key, (
            f"tensor {key} has {count:,} NaN/inf values of {tensor.numel():,}{_more(len(bad) - 1)}; "
            "the file is damaged or comes from a diverged run: download or export it again"
        )
    return None


def first_line(err: BaseException, limit: int = 160) -> str:
    """The informative line of an exception's text (torch's can run to a dozen lines)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)] or lines or [type(err).__name__]
    line = lines[0].split(". This is an internal")[0]  # miniz's zip errors append a paragraph
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_file_dtypes(path: str | Path) -> None:
    """The dtypes in the headers of `path` (a .safetensors file, or the ones directly in a folder),
    reading no tensor data. For parts whose loaders copy into float parameters, which would turn
    an int8 tensor into float values without a word."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for file in (f for f in files if f.name.endswith(".safetensors") and f.is_file()):
        try:
            with safe_open(str(file), framework="pt") as f:
                codes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        except Exception:  # unreadable: the loader's own read says so
            continue
        unknown = [k for k, code in codes.items() if code not in HEADER_DTYPES]
        if unknown:
            raise CheckpointError(f"{file}: tensor {unknown[0]} has dtype {codes[unknown[0]]}, not {_NAMES}")
        # empty meta tensors: the value pass sees only the dtypes
        shells = {k: torch.empty(0, dtype=HEADER_DTYPES[code], device="meta") for k, code in codes.items()}
        check_tensors(shells, file)
