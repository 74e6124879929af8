"""Self-Forcing's sequential sampling: one block at a time, all its steps, then a commit pass.

Per block b (frames [b*F, (b+1)*F)):
  1. x = noise(b, 0) at sigma_0 = 1;
  2. for each step i: x0 = x - sigma_i * flow(x, sigma_i); if not the last step, re-noise to the
     next level with fresh noise: x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * noise(b, i + 1);
  3. commit: one more forward on x0 at `commit_sigma` (0) that writes the block's clean K/V.
So a block costs len(steps) + 1 forwards. Noise is addressed by (block, step) (engine/noise.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.config import SamplingConfig
from engine.kv import KVCache
from engine.models.wan import TextKV, WanModel
from engine.noise import NoiseSource


class Denoiser:
    """The model bound to one stream's KV cache: one call is one forward over in-flight frames."""

    def __init__(self, model: WanModel, cache: KVCache, block_frames: int, mode: str = "causal"):
        self.model = model
        self.cache = cache
        self.block_frames = block_frames
        self.mode = mode

    @torch.no_grad()
    def flow(self, x: torch.Tensor, sigma: torch.Tensor, text: TextKV, *, first_frame: int, commit: bool) -> torch.Tensor:
        """flow `[B, C, F, H, W]` (float32) for latents x at per-frame noise levels sigma `[B, F]`."""
        view = self.cache.view(
            first_frame=first_frame, frames=x.shape[2], block_frames=self.block_frames, mode=self.mode, commit=commit
        )
        out = self.model(x, sigma, text, view)
        view.finish()
        return out


@dataclass
class Block:
    """A finished block: its index, first latent frame and clean latents `[B, C, F, H, W]`."""

    index: int
    first_frame: int
    latents: torch.Tensor


def _levels(sigma: float, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch, frames), sigma, dtype=torch.float32, device=device)


def denoise_block(
    denoiser: Denoiser, text: TextKV, noise: NoiseSource, sigmas: list[float], block: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Run all denoising steps of one block; returns its clean prediction x0 (float32)."""
    device = denoiser.cache.k.device
    B, _, F = shape[:3]
    first_frame = block * F
    x = noise.noise(shape, block, 0, device)
    for step, sigma in enumerate(sigmas):
        flow = denoiser.flow(x, _levels(sigma, B, F, device), text, first_frame=first_frame, commit=False)
        x0 = x - sigma * flow
        if step + 1 < len(sigmas):
            next_sigma = sigmas[step + 1]
            x = (1.0 - next_sigma) * x0 + next_sigma * noise.noise(shape, block, step + 1, device)
    return x0


def self_forcing(
    denoiser: Denoiser,
    text: TextKV | Callable[[int], TextKV],
    sampling: SamplingConfig,
    noise: NoiseSource,
    block_shape: tuple[int, ...],
    num_blocks: int | None,
) -> Iterator[Block]:
    """Yield finished blocks in order; `num_blocks=None` streams forever.

    `text` is fixed, or a function of the block index giving the prompt's K/V (a prompt switch
    takes effect at the next block). The last block of a finite run skips its commit pass, whose only
    effect would be K/V that nothing reads.
    """
    sigmas = sampling.sigmas()
    B, _, F = block_shape[:3]
    device = denoiser.cache.k.device
    block = 0
    while num_blocks is None or block < num_blocks:
        prompt = text(block) if callable(text) else text
        x0 = denoise_block(denoiser, prompt, noise, sigmas, block, block_shape)
        if num_blocks is None or block + 1 < num_blocks:
            commit_levels = _levels(sampling.commit_sigma, B, F, device)
            denoiser.flow(x0, commit_levels, prompt, first_frame=block * F, commit=True)
        yield Block(index=block, first_frame=block * F, latents=x0)
        block += 1
