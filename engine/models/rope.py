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

    `tables(first_frame, frames)` gives unit complex rotations `[frames * T, head_dim/2]`
    (complex64) for tokens laid out frame-major, then row, then column, as the patch embedding
    flattens them.
    """

    def __init__(self, cfg: WanConfig, grid_hw: tuple[int, int], device: torch.device | str | None = None):
        self.grid_hw = grid_hw
        self.tokens_per_frame = grid_hw[0] * grid_hw[1]
        pairs_t, pairs_h, pairs_w = cfg.rope_pairs
        self.time_freqs = _axis_frequencies(pairs_t, cfg.rope_theta, device)
        self.spatial = self._spatial_angles(cfg, grid_hw, device)  # [T, pairs_h + pairs_w] float64

    @staticmethod
    def _spatial_angles(cfg: WanConfig, grid_hw: tuple[int, int], device) -> torch.Tensor:
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
        return angles

    def tables(self, first_frame: int, frames: int) -> torch.Tensor:
        """Rotations `[frames * T, head_dim/2]` for frames at positions first_frame, first_frame+1, ..."""
        device = self.time_freqs.device
        positions = torch.arange(first_frame, first_frame + frames, dtype=torch.float64, device=device)
        angle_t = torch.outer(positions, self.time_freqs)  # [F, pt] float64: exact for any position
        angles = torch.cat(
            [
                angle_t[:, None, :].expand(frames, self.tokens_per_frame, -1),
                self.spatial[None].expand(frames, -1, -1),
            ],
            dim=-1,
        ).reshape(frames * self.tokens_per_frame, self.time_freqs.shape[0] + self.spatial.shape[-1])
        return _unit(angles)

    @property
    def device(self) -> torch.device:
        return self.time_freqs.device

    @staticmethod
    def apply(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Rotate q or k `[B, N, H, Dh]` by this family's tables (views call this, not `apply_rope`)."""
        return apply_rope(x, rotation)

    def time_shift(self, frames: int) -> torch.Tensor:
        """Rotations `[head_dim/2]` that move an already rotated key `frames` positions later in time."""
        zeros = torch.zeros(self.spatial.shape[-1], dtype=torch.float64, device=self.time_freqs.device)
        return _unit(torch.cat([frames * self.time_freqs, zeros]))


def _unit(angles: torch.Tensor) -> torch.Tensor:
    # float64 angles -> complex64 e^{i angle}, rounded once
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x `[B, N, H, Dh]` by complex `[N, Dh/2]` (or `[Dh/2]`) rotations."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, N, H, Dh/2]
    if rotation.dim() == 2:
        rotation = rotation[:, None, :]  # broadcast over heads
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)
