"""What a model family is: one object that says how its network is built, seeded, loaded,
conditioned on text, placed in time and space (rotary tables), counted (FLOPs), probed by
feature caching, and how given frames (an image, a clip) become the clean blocks a stream starts
from (`encode_start`). Everything else in arcade asks the preset's family (`family_of`) instead of
testing the family's name.

A family's own module subclasses `Family`; engine/families/__init__.py registers it in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig, Preset, VaeConfig
from engine.devices import SetupError
from engine.media import fit_frames
from engine.models.magi_tokens import SpecialTokens
from engine.weight_paths import WeightPaths

TextEmbedding = Callable[[torch.Tensor], object]
"""Encoder states `[1, L, text_dim]` (zero past the prompt) -> the family's cross-attention K/V."""


class Family:
    """Defaults say what a family does not offer; a family's module overrides what it does."""

    name: str
    tiny_preset: str
    """The family's tiny random preset: benchmarks count a real preset's plan on it."""
    stand_in_keeps: tuple[str, ...] = ()
    """Model switches a tiny stand-in keeps from the real model (they change the forward's shape)."""
    signals: frozenset[str] = frozenset()
    """Cache signals (cache/signals.py) its network offers: embedded, modulated, first_block."""
    sp_layer_modelled: bool = False
    """Whether launch/throughput.py's tile-wave model of one layer under sp describes its layer."""

    def new_model(self, cfg: ModelConfig) -> torch.nn.Module:
        """The network (on the current default device; meta for counting)."""
        raise NotImplementedError

    def init_random_(self, model: torch.nn.Module, seed: int) -> None:
        """Seeded random weights in place."""
        raise NotImplementedError

    def load_checkpoint(self, model, preset: Preset, weights: WeightPaths, path: Path, *, device, edit=None):
        """The transformer's weights from `path` into the meta `model` (engine/models/checkpoints)."""
        raise NotImplementedError

    def rope(self, preset: Preset, grid: tuple[int, int], device, model=None):
        """The rotary tables for latent frames of `grid` tokens (height, width)."""
        raise NotImplementedError

    def text_embedding(self, preset: Preset, model, special: SpecialTokens | None) -> TextEmbedding:
        """How a prompt's encoder states become the K/V its cross-attention reads."""
        raise NotImplementedError

    def forward_flops(self, cfg: ModelConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
        """FLOPs of one forward per guidance branch (engine/models/flops.py)."""
        raise NotImplementedError

    def kv_commit_from(self, branches: int) -> int | None:
        """The guidance branch whose K/V a commit writes for every branch (None: each its own)."""
        return None

    def modulated(self, model, latents: torch.Tensor, sigma: torch.Tensor, fps) -> torch.Tensor:
        """Layer 0's timestep-modulated self-attention input `[B, N, dim]` (TeaCache's signal)."""
        raise NotImplementedError(f"{self.name} models offer no modulated-input signal")

    def first_layer(self, model, x: torch.Tensor, sigma: torch.Tensor, fps, text, view) -> torch.Tensor:
        """Layer 0's output on embedded tokens `x` `[B, N, dim]` with its real context `view`."""
        raise NotImplementedError(f"{self.name} models offer no first-layer signal")

    def encode_start(self, preset: Preset, decoder, frames: np.ndarray, latent_frames: int) -> torch.Tensor:
        """Given frames `[T, H, W, 3]` uint8 (any size) -> the clean latents `[1, C, P * F, h, w]`
        a stream starts from: a whole number P >= 1 of blocks of F frames, at most `latent_frames`,
        encoded by the family's own VAE (`decoder`, the session's). An image is a clip of one frame."""
        raise SetupError(f"{self.name} streams cannot start from given frames yet (an image or a clip)")


def start_pixels(vae: VaeConfig, frames: np.ndarray, frames_per_block: int, latent_frames: int) -> np.ndarray:
    """The clip's last frames that encode to whole blocks: as many blocks as the clip holds, at
    most `latent_frames` latent frames, at least one block. A clip shorter than one block (an
    image) is held on its first frame at the front, so the block starts still and ends on the
    clip's last frame; with a causal VAE the first latent frame is then the first frame's own."""
    held = vae.latent_frames(len(frames))
    blocks = max(1, min(held, latent_frames) // frames_per_block)
    needed = vae.pixel_frames(blocks * frames_per_block)  # pixel frames of those latents
    if len(frames) >= needed:
        return frames[len(frames) - needed :]
    return np.concatenate([np.repeat(frames[:1], needed - len(frames), axis=0), frames])


def encode_whole_blocks(preset: Preset, decoder, frames: np.ndarray, latent_frames: int) -> torch.Tensor:
    """`Family.encode_start` for a VAE with `encode(uint8 frames)` (Wan's, the demo's codec):
    frames fitted to the stream's size (engine.media.fit_frames), cut or held to whole blocks."""
    stream = preset.stream
    fitted = fit_frames(frames, stream.height, stream.width)
    latents = decoder.encode(start_pixels(preset.vae, fitted, stream.frames_per_block, latent_frames))
    if latents.shape[2] % stream.frames_per_block:  # a VAE whose frame arithmetic differs from VaeConfig's
        made, block = latents.shape[2], stream.frames_per_block
        raise SetupError(f"{made} encoded latent frames are not whole {block}-frame blocks")
    return latents.float()
