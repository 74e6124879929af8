"""Streaming VAE encode for video in: pixel frames of each block become that block's latents.

The mirror of engine/models/vae.py's StreamingDecoder. diffusers' `AutoencoderKLWan._encode` runs
the encoder on the first frame alone, then on groups of `temporal_stride` (4) frames, through
causal convolutions whose feature cache it clears after each call. Here the cache lives in the
encoder object, so a stream encoded block by block (9 pixel frames for a first block of 3 latent
frames, 12 for each later one) gives the latents of one encode of the whole clip. Latents come
out normalised as the model sees them: (mean of the posterior - latents_mean) / latents_std.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.config import VaeConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan


class StreamingEncoder:
    """uint8 frames `[F, H, W, 3]` (a whole number of the VAE's frame groups) -> latents `[1, C, f, h, w]`."""

    def __init__(self, vae: AutoencoderKLWan, cfg: VaeConfig, stride: int = 4):
        self.vae, self.stride = vae, stride
        mean = cfg.latents_mean or vae.config.latents_mean
        std = cfg.latents_std or vae.config.latents_std
        param = next(vae.parameters())
        self.mean = torch.tensor(mean, dtype=torch.float32, device=param.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1, 1)
        self.reset()

    def reset(self) -> None:
        """Start a new clip: forget the causal-convolution cache."""
        self._feat_map: list = [None] * self.vae._cached_conv_counts["encoder"]
        self._frames_seen = 0

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        param = next(self.vae.parameters())
        video = torch.from_numpy(np.ascontiguousarray(frames)).to(param.device)
        x = (video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0).to(param.dtype)  # [1, 3, F, H, W]
        outputs, start = [], 0
        while start < x.shape[2]:
            size = 1 if self._frames_seen == 0 else self.stride  # the first frame is encoded alone
            outputs.append(self.vae.encoder(x[:, :, start : start + size], feat_cache=self._feat_map, feat_idx=[0]))
            start, self._frames_seen = start + size, self._frames_seen + size
        moments = self.vae.quant_conv(torch.cat(outputs, dim=2)).float()
        mean = moments[:, : self.mean.shape[1]]  # the posterior's mean: no sampling noise
        return (mean - self.mean) / self.std
