"""Merge LoRA adapters into Wan weights: W <- W + (alpha / rank) * B @ A.

LongLive ships its model as a base `.pt` plus a rank-256 LoRA (`lora.pt`, peft state dict,
possibly under `generator_lora`, alpha = rank). peft, diffusers and ComfyUI key styles all
normalise to `<wan module>.lora_A.weight` / `.lora_B.weight` here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from engine.models.checkpoints.validate import check_tensors
from engine.models.checkpoints.wan import CheckpointError, normalize_keys, read_safetensors, read_torch

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def read_lora(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A `[rank, in]`, B `[out, rank]`) from a LoRA file."""
    path = Path(path)
    raw = read_safetensors(path) if path.name.endswith(".safetensors") else read_torch(path)
    raw = raw.get("generator_lora", raw)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of LoRA tensors, found {type(raw).__name__}")
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    state, file_keys = normalize_keys(tensors), normalize_keys({k: k for k in tensors})
    adapters = {key: tensor for key, tensor in state.items() if _LORA_KEY.match(key)}
    check_tensors(adapters, path, file_keys=file_keys)  # an int8 or NaN adapter would corrupt W
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapters.items():
        match = _LORA_KEY.match(key)
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    incomplete = sorted(m for m, p in pairs.items() if len(p) != 2)
    if incomplete or not pairs:
        raise CheckpointError(f"{path}: no complete lora_A/lora_B pairs (incomplete: {incomplete[:8]})")
    return {module: (p["A"], p["B"]) for module, p in pairs.items()}


class LoraMerge:
    """The adapters of a LoRA file, checked against a model's weights (a meta model will do) before
    any transformer weight is read, then merged into each weight as it loads: an `Edit` for
    `streaming.stream_into`. Each merge runs in float32 on the weight's device."""

    def __init__(self, model: torch.nn.Module, path: str | Path, *, alpha: float | None = None):
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.path = Path(path)
        self.adapters = read_lora(path)
        _check_fits(self.adapters, shapes, self.path)
        self.alpha = alpha
        self.merged = 0

    def __call__(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` `[out, in]` + scale * B @ A in float32, or `weight` itself without an adapter."""
        pair = self.adapters.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if pair is None:
            return weight
        self.merged += 1
        return _merged(weight, *pair, self.alpha)


def _check_fits(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], shapes: dict[str, tuple], path: Path) -> None:
    unknown = sorted(m for m in adapters if f"{m}.weight" not in shapes)
    if unknown:
        raise CheckpointError(f"{path}: adapters for modules the model does not have: {unknown[:8]}")
    for module, (down, up) in adapters.items():
        rank = down.shape[0]
        if up.shape[1] != rank or (up.shape[0], down.shape[1]) != shapes[f"{module}.weight"]:
            raise CheckpointError(
                f"{path}: {module}: lora shapes A{tuple(down.shape)} B{tuple(up.shape)} "
                f"do not fit {shapes[f'{module}.weight']}"
            )


def _merged(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """W + (alpha / rank) * B @ A in float32; alpha defaults to the rank (scale 1)."""
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    delta = up.to(weight.device).float() @ down.to(weight.device).float()  # [out, in]
    return weight.float() + scale * delta


@torch.no_grad()
def merge_lora(model: torch.nn.Module, path: str | Path, *, alpha: float | None = None) -> int:
    """Add the adapter in `path` into `model`'s (loaded) linear weights; returns the number merged.

    `alpha` defaults to the rank (scale 1), which is how LongLive's adapter was trained.
    """
    params = dict(model.named_parameters())
    merge = LoraMerge(model, path, alpha=alpha)
    for module in merge.adapters:
        weight = params[f"{module}.weight"]
        weight.copy_(merge(f"{module}.weight", weight).to(weight.dtype))
    return merge.merged
