"""The Wan family: Wan2.1 DiTs and the models built on their layout (Self-Forcing, CausVid,
SkyReels-V2, LongLive, the demo model). A variant is a preset, not a family: SkyReels-V2 is a Wan
network with its own plan (engine/plan/skyreels.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.config import Preset, WanConfig
from engine.families.base import Family, TextEmbedding, encode_whole_blocks
from engine.models.checkpoints.wan import load_weights
from engine.models.flops import wan_forward_flops
from engine.models.random_init import init_random_
from engine.models.rope import Rope
from engine.models.wan import WanModel
from engine.weight_paths import WeightPaths


class Wan(Family):
    name = "wan"
    tiny_preset = "tiny-wan"
    stand_in_keeps = ("fps_embedding",)
    signals = frozenset({"embedded", "modulated", "first_block"})
    sp_layer_modelled = True

    def new_model(self, cfg: WanConfig) -> WanModel:
        return WanModel(cfg)

    def init_random_(self, model: WanModel, seed: int) -> None:
        init_random_(model, seed)

    def load_checkpoint(self, model: WanModel, preset: Preset, weights: WeightPaths, path: Path, *, device, edit=None):
        return load_weights(model, path, ema=weights.ema, device=device, dtypes="model", edit=edit)

    def rope(self, preset: Preset, grid: tuple[int, int], device, model=None) -> Rope:
        return Rope(preset.model, grid, device)

    def text_embedding(self, preset: Preset, model: WanModel, special=None) -> TextEmbedding:
        return model.embed_text

    def forward_flops(self, cfg: WanConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
        return wan_forward_flops(cfg, query_tokens, key_tokens, text_tokens)

    def modulated(self, model: WanModel, latents: torch.Tensor, sigma: torch.Tensor, fps) -> torch.Tensor:
        _, e6 = model.time_modulation(sigma, fps)
        return model.blocks[0].attention_input(model.embed(latents), e6)

    def first_layer(self, model: WanModel, x: torch.Tensor, sigma: torch.Tensor, fps, text, view) -> torch.Tensor:
        _, e6 = model.time_modulation(sigma, fps)
        return model.blocks[0](x, e6, text.keys[0], text.values[0], 0, view)

    def encode_start(self, preset: Preset, decoder, frames: np.ndarray, latent_frames: int) -> torch.Tensor:
        """Wan's causal VAE (or the demo's patch codec) encodes the clip's last frames in one call;
        an image is held still for the first block (its first latent frame is the image's own
        latent, as Self-Forcing's and LongLive's image-to-video take it)."""
        return encode_whole_blocks(preset, decoder, frames, latent_frames)


WAN = Wan()
