"""MAGI-1's rotary embedding: learnable frequencies over (time, height, width), on 96 of 128 channels.

Per token at grid position (t, h, w), with the 16 learned `bands` (initialised 10000^(-i/16)):
angles = [t * bands, h' * bands, w' * bands] (48 values, axis-major), where t is the absolute
latent frame and h', w' are the row and column centred on the grid and rescaled to a reference
grid of 256 tokens: h' = (row - (Hp - 1) / 2) * (Hp / r - 1) / (Hp - 1), r = sqrt(Hp * Wp / 256).
(The reference also "rescales" time, by (T - 1) / (T - 1) = 1.) Channel d of each head turns
with channel d + 48 by angle d (GPT-NeoX style, not interleaved); channels 96..127 stay put.

Time enters only as the absolute frame index, so a key rotated once when it is written keeps
its meaning for every later query (what the KV cache relies on).
"""

from __future__ import annotations

import math

import torch

REFERENCE_TOKENS = 256
"""The spatial grid size (in tokens) MAGI-1 rescales every resolution to."""


def _centred_axis(size: int, scale_ref: float, device) -> torch.Tensor:
    # [size] float64: centred coordinates, rescaled so that the grid spans scale_ref - 1
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    if size == 1:
        return coords
    return coords / (size - 1) * (scale_ref - 1)


class MagiRope:
    """Rotation tables for one latent grid (`grid_hw` tokens per frame), from the model's bands."""

    def __init__(self, bands: torch.Tensor, grid_hw: tuple[int, int], device: torch.device | str | None = None):
        self.grid_hw = grid_hw
        self.tokens_per_frame = grid_hw[0] * grid_hw[1]
        self.bands = bands.detach().to(device=device, dtype=torch.float64)  # [16]
        self.rotary_pairs = 3 * self.bands.shape[0]  # 48 pairs = 96 channels
        gh, gw = grid_hw
        r = math.sqrt(gh * gw / REFERENCE_TOKENS)
        rows = _centred_axis(gh, gh / r, self.bands.device)
        cols = _centred_axis(gw, gw / r, self.bands.device)
        angle_h = torch.outer(rows, self.bands)[:, None, :].expand(gh, gw, -1)
        angle_w = torch.outer(cols, self.bands)[None, :, :].expand(gh, gw, -1)
        self.spatial = torch.cat([angle_h, angle_w], dim=-1).reshape(gh * gw, -1)  # [T, 32] float64

    @property
    def device(self) -> torch.device:
        return self.bands.device

    def tables(self, first_frame: int, frames: int) -> torch.Tensor:
        """Unit rotations `[frames * T, 48]` (complex64) for frames first_frame, first_frame + 1, ..."""
        positions = torch.arange(first_frame, first_frame + frames, dtype=torch.float64, device=self.device)
        angle_t = torch.outer(positions, self.bands)[:, None, :].expand(frames, self.tokens_per_frame, -1)
        spatial = self.spatial[None].expand(frames, -1, -1)
        angles = torch.cat([angle_t, spatial], dim=-1).reshape(frames * self.tokens_per_frame, -1)
        return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

    def apply(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Rotate channels (d, d + 48), d < 48, of x `[B, N, H, Dh]` by `rotation [N, 48]`, in float32."""
        pairs = self.rotary_pairs
        first, second, rest = x[..., :pairs].float(), x[..., pairs : 2 * pairs].float(), x[..., 2 * pairs :]
        turned = torch.complex(first, second) * rotation[:, None, :]
        return torch.cat([turned.real.type_as(x), turned.imag.type_as(x), rest], dim=-1)

    def time_shift(self, frames: int) -> torch.Tensor:
        raise NotImplementedError("MAGI-1 keeps no sink frames to re-base")
