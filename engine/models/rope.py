"""3-axis rotary position embedding of Wan, with frame positions computed on the fly.

Wan rotates interleaved pairs of each head: head_dim/2 pairs split between the time, height and
width axes (for head_dim 128: 22 / 21 / 21 pairs), frequencies theta^(-2j/D_axis) with D_axis the
axis' real width. The reference code looks positions up in a 1024-entry table, which caps a
stream at 1024 latent frames; here the angle `position * frequency` is computed in float64 for
exactly the frame positions a call needs, so any position works.
"""

from __future__ import annotations

import torch

from engine.config import WanConfig


def _axis_frequencies(pairs: int, theta: float, device: torch.device | None) -> torch.Tensor:
    # [pairs] float64: theta^(-2j / D) with D = 2*pairs real dims on this axis
    exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device) / (2 * pairs)
    return theta**-exponent


class Rope:
    """Rotation tables for one latent grid (tokens_per_frame = grid_h * grid_w).

    `tables(first_frame, frames)` gives cos/sin `[frames * T, head_dim/2]` (float32) for tokens
    laid out frame-major, then row, then column, as the patch embedding flattens them.
    """

    def __init__(self, cfg: WanConfig, grid_hw: tuple[int, int], device: torch.device | str | None = None):
        self.grid_hw = grid_hw
        self.tokens_per_frame = grid_hw[0] * grid_hw[1]
        pairs_t, pairs_h, pairs_w = cfg.rope_pairs
        self.time_freqs = _axis_frequencies(pairs_t, cfg.rope_theta, device)
        self.spatial_cos, self.spatial_sin = self._spatial_tables(cfg, grid_hw, device)

    @staticmethod
    def _spatial_tables(cfg: WanConfig, grid_hw: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        _, pairs_h, pairs_w = cfg.rope_pairs
        grid_h, grid_w = grid_hw
        rows = torch.arange(grid_h, dtype=torch.float64, device=device)
        cols = torch.arange(grid_w, dtype=torch.float64, device=device)
        angle_h = torch.outer(rows, _axis_frequencies(pairs_h, cfg.rope_theta, device))  # [gh, ph]
        angle_w = torch.outer(cols, _axis_frequencies(pairs_w, cfg.rope_theta, device))  # [gw, pw]
        angles = torch.cat(
            [angle_h[:, None, :].expand(grid_h, grid_w, pairs_h), angle_w[None, :, :].expand(grid_h, grid_w, pairs_w)],
            dim=-1,
        ).reshape(grid_h * grid_w, pairs_h + pairs_w)
        return angles.cos().float(), angles.sin().float()

    def tables(self, first_frame: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[frames * T, head_dim/2]` for frames at positions first_frame, first_frame+1, ..."""
        device = self.time_freqs.device
        positions = torch.arange(first_frame, first_frame + frames, dtype=torch.float64, device=device)
        angle_t = torch.outer(positions, self.time_freqs)  # [F, pt] float64: exact for any position
        cos_t = angle_t.cos().float()[:, None, :].expand(frames, self.tokens_per_frame, -1)
        sin_t = angle_t.sin().float()[:, None, :].expand(frames, self.tokens_per_frame, -1)
        cos_s = self.spatial_cos[None].expand(frames, -1, -1)
        sin_s = self.spatial_sin[None].expand(frames, -1, -1)
        pairs = self.time_freqs.shape[0] + self.spatial_cos.shape[-1]
        cos = torch.cat([cos_t, cos_s], dim=-1).reshape(frames * self.tokens_per_frame, pairs)
        sin = torch.cat([sin_t, sin_s], dim=-1).reshape(frames * self.tokens_per_frame, pairs)
        return cos, sin

    def time_shift(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[head_dim/2]` that move an already rotated key `frames` positions later in time."""
        angle_t = frames * self.time_freqs
        spatial = self.spatial_cos.shape[-1]
        zeros = torch.zeros(spatial, dtype=torch.float64, device=angle_t.device)
        angles = torch.cat([angle_t, zeros])
        return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x `[B, N, H, Dh]` by angles with cos/sin `[N, Dh/2]` (or `[Dh/2]`)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, N, H, Dh/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
