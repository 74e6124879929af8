"""The GPU report's first step: what this machine offers, and a fast stop when it cannot run.

Read before any variant runs: torch and CUDA versions, the card, which scaled-dot-product-
attention kernels run a small bf16 call here (each tried, not just enabled), whether
FlashAttention-3 (`flash_attn_interface`) or FlashAttention-2 is installed, the versions of the
packages the engine imports, and the dense-matmul peak in the run's dtype (the roof the variants'
TFLOP/s are compared with).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.devices import SetupError
from launch.benchmarks.timing import matmul_peak_tflops

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
PACKAGES = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "numpy", "triton")
FLASH_MODULES = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def check_device(device: torch.device) -> None:
    """Stop at once (one line, with the fix) where the run cannot start."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sdpa_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Each SDPA kernel on a small call shaped like the models' ([1, 12 heads, 256, 128]): "ok",
    or the first line of why it refused."""
    q = torch.randn(1, 12, 256, 128, device=device, dtype=dtype)
    found = {}
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
            found[name] = "ok"
        except RuntimeError as err:
            found[name] = "no: " + (str(err).strip().splitlines() or ["refused"])[0][:80]
    return found


def flash_packages() -> dict[str, str | None]:
    """FlashAttention-3 / -2 packages: their version where installed (None where not)."""
    found = {}
    for key, module in FLASH_MODULES.items():
        if importlib.util.find_spec(module) is None:
            found[key] = None
            continue
        try:
            found[key] = importlib.metadata.version(module.replace("_interface", "_3").replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[key] = "installed"
    return found


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """The report's environment section; the matmul peak is measured here, once."""
    check_device(device)
    size, repeats = (8192, 20) if device.type == "cuda" else (512, 4)
    env = {
        "card": card_name(device),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "packages": package_versions(),
        "sdpa": sdpa_backends(device, dtype),
        "flash_attn": flash_packages(),
        "peak_tflops": max(matmul_peak_tflops(device, dtype, size, repeats) for _ in range(2)),
        "peak_matmul": f"{size}x{size}x{size} {str(dtype).removeprefix('torch.')}, best of 2 x {repeats}",
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the children get the memory
    return env
