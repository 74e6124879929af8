"""Which device and dtype a run uses, and the one error every setup check raises.

The bottom of the engine beside engine/config.py: it imports only torch, so a command can pick
its device (and refuse a wrong `--device` in one line) without importing any model or loader.
"""

from __future__ import annotations

import torch


class SetupError(RuntimeError):
    """Weights or options that do not make a runnable pipeline (said before anything loads)."""


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:1`, ...: a device this machine has, or SetupError saying why not
    (checked here, before anything is built, so the message is not torch's deep inside a load)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise SetupError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        _check_cuda(name, device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SetupError(f"--device {name}: this machine or torch build has no MPS support; use --device cpu")
    elif device.type not in ("cpu", "mps"):
        raise SetupError(f"--device {name}: arcade runs on cpu, cuda or mps")
    return device


def _check_cuda(name: str, device: torch.device) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise SetupError(
            f"--device {name}: this torch build ({torch.__version__}) has no CUDA support; "
            "use --device cpu, or install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise SetupError(
            f"--device {name}: no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?); use --device cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SetupError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise SetupError(f"unknown dtype {name!r} (choose from auto, {', '.join(dtypes)})")
    return dtypes[name]
