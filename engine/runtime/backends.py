"""Which scaled-dot-product-attention kernel runs the model's attention: chosen once per process.

The models call `F.scaled_dot_product_attention` with a boolean block mask (or none); which
kernel runs it is a device choice, applied by the runtime around the forward
(`AttentionChoice.context()`, a `torch.nn.attention.sdpa_kernel` context), never inside the model.

    auto on CUDA, Hopper (sm90+): cuDNN, then flash, then memory-efficient, then math: SDPA takes
                                  the first one that can run a call (flash takes no mask, so the
                                  block-masked calls fall to cuDNN or the efficient kernel)
    auto on other CUDA GPUs:      flash, efficient, math (cuDNN last: it is not faster there)
    auto on CPU:                  torch's own choice, unchanged
    a named backend:              that one first, then the others of auto's order for calls it
                                  cannot take; `math` alone (it takes every call: the reference)

FlashAttention-3 (`flash_attn_interface`) is noticed but not used: its causal mask is per token,
and the KV-cached block-causal call needs a per-block one (or an arbitrary mask), which it does
not take. Every choice is exact attention; only rounding differs.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.config import ConfigError

BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
HOPPER = (9, 0)


@dataclass(frozen=True)
class DeviceCaps:
    """What a device offers SDPA (tests fake these to check the choice without the hardware)."""

    device_type: str
    capability: tuple[int, int] | None = None
    """CUDA compute capability, e.g. (9, 0) for H100/H200; None off CUDA."""
    flash: bool = False
    efficient: bool = False
    cudnn: bool = False
    fa3: bool = False
    """`flash_attn_interface` (FlashAttention-3) is importable."""

    def has(self, name: str) -> bool:
        if name == "math":
            return True
        if self.device_type == "cpu":
            return name == "flash"  # torch's CPU flash kernel (takes masks); no efficient/cuDNN on CPU
        return self.device_type == "cuda" and getattr(self, name)


def device_caps(device: torch.device) -> DeviceCaps:
    """The real capabilities of `device`."""
    fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    if device.type != "cuda":
        return DeviceCaps(device.type, fa3=fa3)
    cuda = torch.backends.cuda
    return DeviceCaps(
        "cuda",
        capability=torch.cuda.get_device_capability(device),
        flash=cuda.is_flash_attention_available(),
        efficient=True,
        cudnn=torch.backends.cudnn.is_available(),
        fa3=fa3,
    )


@dataclass(frozen=True)
class AttentionChoice:
    requested: str
    order: tuple[str, ...] | None
    """Backends SDPA may use, in priority order; None: torch's own choice."""
    note: str = ""

    def context(self):
        """The context the runtime holds around a forward."""
        if self.order is None:
            return contextlib.nullcontext()
        return sdpa_kernel([BACKENDS[name] for name in self.order], set_priority=True)

    def line(self) -> str:
        """One line for start-up."""
        chosen = "torch's default kernels" if self.order is None else " > ".join(self.order)
        return f"attention ({self.requested}): {chosen}" + (f"; {self.note}" if self.note else "")


def _auto_order(caps: DeviceCaps) -> tuple[str, ...]:
    hopper = caps.capability is not None and caps.capability >= HOPPER
    preferred = ("cudnn", "flash", "efficient") if hopper else ("flash", "efficient", "cudnn")
    return tuple(name for name in preferred if caps.has(name)) + ("math",)


def choose_attention(requested: str, caps: DeviceCaps) -> AttentionChoice:
    """The SDPA backends for `requested` (auto or a name of BACKENDS) on a device with `caps`."""
    if requested != "auto" and requested not in BACKENDS:
        raise ConfigError(f"attention backend must be auto or one of {tuple(BACKENDS)}, got {requested!r}")
    note = "flash_attn_interface found, not used: it takes token-causal masks, not block masks" if caps.fa3 else ""
    if requested == "math":
        return AttentionChoice(requested, ("math",), note)
    if not caps.has(requested if requested != "auto" else "math"):
        where = caps.device_type + ("" if caps.capability is None else " sm{}{}".format(*caps.capability))
        raise ConfigError(f"--attention-backend {requested} is not available on {where}: use auto or math")
    if caps.device_type != "cuda":
        order = None if requested == "auto" else (requested, "math")
        return AttentionChoice(requested, order, note)
    auto = _auto_order(caps)
    order = auto if requested == "auto" else (requested, *(name for name in auto if name != requested))
    return AttentionChoice(requested, order, note)
