"""Streaming VAE encode (video in) equals one-shot encode of the whole clip.

pytest tests/models/test_video_encode.py
"""

import numpy as np
import torch

from engine.config import VaeConfig
from engine.models.vae import random_vae
from engine.models.vae_encoder import StreamingEncoder
from helpers import assert_close

TINY_VAE = VaeConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(0.5, 1.5, 1.0, 2.0))  # fmt: skip


def test_block_by_block_encode_equals_one_shot():
    """A stream's blocks of 9 then 12 then 12 pixel frames (3 latent frames each) give the latents
    of one diffusers encode of all 33 frames (the posterior's mean, normalised); reset restarts."""
    vae = random_vae(TINY_VAE, seed=0)
    clip = np.random.default_rng(0).integers(0, 256, size=(33, 16, 16, 3), dtype=np.uint8)
    pixels = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    mean = torch.tensor(TINY_VAE.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY_VAE.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = (vae.encode(pixels).latent_dist.mean - mean) / std
    encoder = StreamingEncoder(vae, TINY_VAE)
    parts = [encoder(clip[a:b]) for a, b in ((0, 9), (9, 21), (21, 33))]
    assert [p.shape[2] for p in parts] == [3, 3, 3]
    assert_close(torch.cat(parts, dim=2), expected, 1e-4, "streamed encode")
    encoder.reset()
    assert_close(encoder(clip[:9]), parts[0], 0.0, "encode after reset")
