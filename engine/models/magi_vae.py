"""MAGI-1's transformer VAE (`ViTVAE`) as pure math: a ViT encoder and a ViT decoder.

Rules of this file:
- Parameter names are those of the released `ckpt/vae/diffusion_pytorch_model.safetensors`
  (`encoder.patch_embed.proj`, `encoder.blocks.N.attn.qkv`, `decoder.last_layer`, ...), so the
  state dict loads as is.
- One call works on one tile, as the reference's `encode` / `decode` do; tiling and blending are in
  engine/models/magi_vae_tiles.py.
- Every block attends over all tokens of the tile (no mask) after a learned class token; q, k and
  v are each normalised over their head channels without weights: (x - mean) / (std + 1e-5), std
  biased. The released blocks have no norm before attention (only `norm2` before the MLP).
- The learned position table is laid out for the trained clip (16 x 256 x 256 pixels: 4 x 32 x 32
  tokens); a tile of another size interpolates it trilinearly (align_corners False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MagiVaeConfig

QKV_NORM_EPS = 1e-5


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        mean = qkv.mean(dim=-1, keepdim=True)
        std = qkv.std(dim=-1, keepdim=True, unbiased=False)
        qkv = (qkv - mean) / (std + QKV_NORM_EPS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: MagiVaeConfig):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MagiVaeConfig):
        super().__init__()
        kernel = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.dim, kernel_size=kernel, stride=kernel)


class _Trunk(nn.Module):
    """What encoder and decoder share: class token, position table, blocks, final norm."""

    def __init__(self, cfg: MagiVaeConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = (cfg.trained_frames // cfg.patch_length, *(2 * (cfg.trained_size // cfg.patch_size,)))
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[1, 1 + T*H*W, dim]`: the class token's entry, then the table resized to `grid`."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, *self.grid, -1).permute(0, 4, 1, 2, 3)
        table = F.interpolate(table, size=tuple(grid), mode="trilinear", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], table.flatten(2).transpose(1, 2)], dim=1)

    def run(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, T*H*W, dim]` -> the same after the blocks (class token added and dropped)."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = x + self.positions(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


class Encoder(_Trunk):
    def __init__(self, cfg: MagiVaeConfig):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg)
        self.last_layer = nn.Linear(cfg.dim, 2 * cfg.z_dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, 3, T, H, W]` in [-1, 1] -> moments `[B, 2 z, T/4, H/8, W/8]` (mean, then log-variance)."""
        x = self.patch_embed.proj(video)
        b, _, t, h, w = x.shape
        x = self.last_layer(self.run(x.flatten(2).transpose(1, 2), (t, h, w)))
        return x.view(b, t, h, w, -1).permute(0, 4, 1, 2, 3)


class Decoder(_Trunk):
    def __init__(self, cfg: MagiVaeConfig):
        super().__init__(cfg)
        self.unpatch_channels = cfg.dim // (cfg.patch_size**2 * cfg.patch_length)
        self.proj_in = nn.Linear(cfg.z_dim, cfg.dim)
        self.last_layer = nn.Conv3d(self.unpatch_channels, 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, z, t, h, w]` -> pixels `[B, 3, 4t, 8h, 8w]` (not clamped)."""
        b, _, t, h, w = z.shape
        x = self.run(self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, -1)), (t, h, w))
        pt, p, c = self.cfg.patch_length, self.cfg.patch_size, self.unpatch_channels
        # each token's dim channels are (pt, p, p, c): scatter them into its 4 x 8 x 8 pixel cube
        x = x.view(b, t, h, w, pt, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return self.last_layer(x.reshape(b, c, t * pt, h * p, w * p))


class MagiVae(nn.Module):
    """One tile in, one tile out, as the reference's deterministic `encode` and its `decode`."""

    def __init__(self, cfg: MagiVaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, 3, T, H, W]` -> the posterior mean `[B, z, T/4, H/8, W/8]`. A single frame is
        repeated to one temporal patch and gives one latent frame."""
        if video.shape[2] == 1 and self.cfg.patch_length > 1:
            video = video.expand(-1, -1, self.cfg.patch_length, -1, -1)
        return self.encoder(video)[:, : self.cfg.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, z, t, h, w]` -> `[B, 3, 4t, 8h, 8w]`; a single latent frame gives one frame."""
        pixels = self.decoder(z)
        return pixels[:, :, :1] if z.shape[2] == 1 else pixels


def random_magi_vae(cfg: MagiVaeConfig, seed: int) -> MagiVae:
    """Seeded weights: linears and convolutions U(+-1/sqrt(fan_in)) (torch's default init), the
    class tokens and position tables N(0, 0.02), norms 1 / 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = MagiVae(cfg)
        with torch.no_grad():
            for trunk in (vae.encoder, vae.decoder):
                nn.init.trunc_normal_(trunk.cls_token, std=0.02)
                nn.init.trunc_normal_(trunk.pos_embed, std=0.02)
    return vae.eval()
