"""Where the weights live: the three options that let a preset fit a smaller device.

    --text-encoder-device model | cpu | swap   the prompt encoder on the device, on the host, or
                                               on the host and copied over for each new prompt
    --weights native | fp8                     the blocks' Linear weights in e4m3 (fp8_weights.py)
    --offload none | layers                    the blocks in host memory, streamed (streamed_layers.py)

The options are `SpeedConfig` fields (engine/config.py); the session is built in this order:
refusals first (before anything loads), then the transformer where its blocks will live
(`model_home`: the host when they are streamed or quantised), its blocks quantised a block at a
time on the device, then streamed (or the whole model moved to the device); the text
encoder at `encoder_home`, swapping to the device if asked. `MemoryPlacement.line` says what
was done, in the session's start-up line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ConfigError, SpeedConfig
from engine.runtime import fp8_weights
from engine.runtime.streamed_layers import StreamedBlocks, stream_blocks

HOST = torch.device("cpu")


@dataclass
class MemoryPlacement:
    weights: str = "native"
    """native, or which fp8 implementation ran."""
    streamed: StreamedBlocks | None = None
    text_encoder: str = "model"
    vae: str = "float32"
    """--vae-dtype as the decoder took it (said only when not float32)."""

    @property
    def line(self) -> str:
        parts = [f"weights: {self.weights}"]
        if self.streamed is not None:
            blocks = len(self.streamed) - self.streamed.resident
            parts.append(f"offload: {blocks} of {len(self.streamed)} blocks streamed from host memory")
        parts.append(f"text encoder: {self.text_encoder}")
        parts += [f"VAE: {self.vae}"] if self.vae != "float32" else []
        return "; ".join(parts)


def refuse_early(speed: SpeedConfig, device: torch.device) -> None:
    """The options this device or build cannot run, before anything is loaded (ConfigError)."""
    if speed.weights == "fp8":
        why = fp8_weights.refusal(device)
        if why:
            raise ConfigError(why)


def model_home(speed: SpeedConfig, device: torch.device) -> torch.device:
    """Where the transformer is built: on the host when its blocks are to be streamed from there, or
    quantised on their way to the device (the native model need never fit on the device)."""
    return HOST if speed.offload == "layers" or speed.weights == "fp8" else device


def encoder_home(speed: SpeedConfig, device: torch.device) -> torch.device:
    return device if speed.text_encoder_device == "model" else HOST


def place_model(model: nn.Module, speed: SpeedConfig, device: torch.device) -> MemoryPlacement:
    """Quantise the blocks (fp8), then stream them (offload), as `speed` says; in place."""
    placement = MemoryPlacement(text_encoder=_encoder_words(speed, device))
    if speed.weights == "fp8":
        placement.weights = "fp8 (" + quantise_on(model.blocks, device, keep=speed.offload == "none") + ")"
    if speed.offload == "layers":
        placement.streamed = stream_blocks(model, device)
    else:
        model.to(device)
    return placement


def quantise_on(blocks: nn.ModuleList, device: torch.device, keep: bool) -> str:
    """The blocks' Linears to fp8, a block at a time on `device` (the host's CPU converts float8 an
    element at a time, and the native blocks need never all be on the device); each then stays on
    the device (`keep`) or goes back where it was (to be streamed). torchao only for kept blocks."""
    home, used = next(blocks.parameters()).device, "arcade e4m3"
    for block in blocks:
        block.to(device)
        used = fp8_weights.quantise_blocks(nn.ModuleList([block]), device, torchao=keep)
        if not keep:
            block.to(home)
    return used


def _encoder_words(speed: SpeedConfig, device: torch.device) -> str:
    where = speed.text_encoder_device
    if where == "model":
        return f"on {device}"
    if where == "cpu":
        return "on the host (encodes there)"
    return f"in host memory, copied to {device} to encode a new prompt"
