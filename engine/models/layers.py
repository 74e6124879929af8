"""Pieces both model families use."""

from __future__ import annotations

import torch
from torch import nn


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in the layer's own dtype: norms and embeddings run in float32 while the linear
    weights may be bf16, so inputs are cast to the weights rather than the weights to the inputs."""
    return layer(x.to(layer.weight.dtype))
