"""fp8 (e4m3) storage of the transformer blocks' Linear weights, computed in the layer's own dtype.

`--weights fp8` replaces every `nn.Linear` inside the model's blocks by an `Fp8Linear`: the weight
`[out, in]` is stored as e4m3 with one float32 scale per output channel (`amax / 448` of its row,
engine/runtime/fp8.py's `quantise`), and each call dequantises it into the compute dtype (the one
the weight had: bf16 on GPUs, float32 on CPUs, float32 where a model keeps a layer in float32)
before an ordinary `F.linear`. So the matmul is the native one; only the weight's values moved to
the e4m3 grid: |w - w8| <= max(2^-4 |w|, 2^-10 scale) per element (`roundtrip_bound`), and a
Linear's output y = x w^T + b moves by at most sum_j |x_j| bound_ij (`output_bound`).

Memory: the blocks' Linear weights take 1 byte per element plus 4 bytes of scale per output
channel, against 2 (bf16) or 4 (float32); the dequantised weight of the one layer being computed
is transient. Embeddings, norms, modulation and the head stay as they are (a few percent).

torchao's `Float8WeightOnlyConfig` does the same (per-channel e4m3 weights, matmul in the
weight's original precision). It is used when it is installed, the device is CUDA and the blocks
stay resident (its tensor subclass is not what `--offload layers` copies); everywhere else, this
module's own layers. Which one ran is said in the session's speed line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError
from engine.runtime.fp8 import E4M3, SUBNORMAL_STEP, UNIT_ROUNDOFF, dequantise, quantise


class Fp8Linear(nn.Module):
    """`F.linear(x, w8 * scale, bias)` with w8 `[out, in]` e4m3 and scale `[out, 1]` float32."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        weight = layer.weight.detach()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = weight.dtype
        """The dtype the weight had and the matmul keeps (what `linear()` casts inputs to)."""
        self.weight_fp8 = nn.Parameter(torch.empty(weight.shape, dtype=E4M3, device=weight.device), False)
        self.weight_scale = nn.Parameter(torch.empty((weight.shape[0], 1), device=weight.device), False)
        quantise(weight, self.weight_fp8.data, self.weight_scale.data)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), False)

    def dequantised(self) -> torch.Tensor:
        """The weight on the e4m3 grid, `[out, in]` in the compute dtype (a fresh tensor per call)."""
        out = torch.empty(self.weight_fp8.shape, dtype=self.compute_dtype, device=self.weight_fp8.device)
        return dequantise(self.weight_fp8, self.weight_scale, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantised(), self.bias)

    def extra_repr(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 -> {dtype}"


def refusal(device: torch.device) -> str | None:
    """Why `--weights fp8` cannot run on `device` (None: it can): torch needs the float8 dtype and
    its conversions there."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"--weights fp8 needs torch's float8 dtypes; torch {torch.__version__} has none: use --weights native"
    try:
        probe = torch.ones(4, device=device).to(E4M3)
        dequantise(probe, torch.ones(1, device=device), torch.empty(4, device=device))
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"--weights fp8: float8 conversions do not run on {device} ({err}): use --weights native"
    return None


def quantise_blocks(blocks: nn.ModuleList, device: torch.device, *, torchao: bool = True) -> str:
    """Every Linear of `blocks` to fp8, in place; returns which implementation ran ("torchao" or
    "arcade e4m3"). torchao only with `torchao` allowed, on CUDA, where it is installed."""
    why = refusal(device)
    if why:
        raise ConfigError(why)
    if torchao and device.type == "cuda" and _torchao_quantised(blocks):
        return "torchao float8 weight-only"
    for block in blocks:
        _replace_linears(block)
    return "arcade e4m3"


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Fp8Linear(child))
        else:
            _replace_linears(child)


def _torchao_quantised(blocks: nn.ModuleList) -> bool:
    """torchao's float8 weight-only on the blocks, if it is installed and runs a probe layer."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError:
        return False
    device, dtype = _first_linear(blocks).weight.device, _first_linear(blocks).weight.dtype
    try:
        probe = nn.Sequential(nn.Linear(64, 64, device=device, dtype=dtype))
        quantize_(probe, Float8WeightOnlyConfig())
        probe(torch.ones(2, 64, device=device, dtype=dtype))
    except Exception:  # noqa: BLE001  (torchao versions differ: any failure means arcade's own layers)
        return False
    quantize_(blocks, Float8WeightOnlyConfig())
    return True


def _first_linear(blocks: nn.ModuleList) -> nn.Linear:
    return next(m for m in blocks.modules() if isinstance(m, nn.Linear))


def roundtrip_bound(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |w - w8| e4m3 rounding allows per element of `weight` `[out, in]` (scale `[out, 1]`):
    half a step, 2^-4 relative for normal values, half the subnormal step (2^-9 x scale) below."""
    return torch.maximum(UNIT_ROUNDOFF * weight.float().abs(), 0.5 * SUBNORMAL_STEP * scale.float())


def output_bound(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |y - y8| of y = x w^T (+ b) over inputs x `[..., in]`: sum_j |x_j| roundtrip_bound_ij."""
    return x.float().abs() @ roundtrip_bound(weight, scale).T


def stored_bytes(blocks: nn.ModuleList) -> int:
    """Bytes of the blocks' parameters as stored (e4m3 payloads, scales and everything else)."""
    return sum(p.numel() * p.element_size() for p in blocks.parameters())


def blocks_bytes(blocks: nn.ModuleList, storage: str) -> int:
    """Bytes `blocks` (native, e.g. on the meta device after `model.cast(dtype)`) take with their
    Linear weights stored `native` or `fp8` (1 byte each + a float32 scale per output channel);
    everything else as it is. Equals `stored_bytes` after `quantise_blocks` (a test checks)."""
    total = stored_bytes(blocks)
    if storage == "fp8":
        for layer in blocks.modules():
            if isinstance(layer, nn.Linear):
                weight = layer.weight
                total += weight.numel() * (1 - weight.element_size()) + 4 * weight.shape[0]
    return total
