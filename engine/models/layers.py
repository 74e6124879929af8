"""Pieces both model families use."""

from __future__ import annotations

import torch
from torch import nn


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or, for a layer that stores its weight in
    another format (fp8 weights, engine/runtime/fp8_weights.py), the one it says."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in the layer's own dtype: norms and embeddings run in float32 while the linear
    weights may be bf16, so inputs are cast to the weights rather than the weights to the inputs."""
    return layer(x.to(compute_dtype(layer)))


def scaled_normal(*shape: int, divisor: float) -> nn.Parameter:
    """A parameter `torch.randn(shape) / divisor`, as the reference models initialise their
    modulation tables. On the meta device nothing is drawn: arithmetic on meta
    tensors makes torch import its compiler stack (seconds), and a meta model is only measured or
    filled by a checkpoint or a seeded init afterwards."""
    param = nn.Parameter(torch.empty(*shape))
    if not param.is_meta:
        with torch.no_grad():
            param.copy_(torch.randn(*shape) / divisor)
    return param
