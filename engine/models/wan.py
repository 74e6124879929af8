"""The Wan2.1 DiT, written for block-causal streaming. Pure math: no cache policy, no parallelism.
Wan2.2-TI2V-5B is the same network at other sizes (48 latent channels); its per-token timesteps
(the clean image frame at t = 0) are the per-frame ones below.

Parameter names are Wan's own (`blocks.0.self_attn.q.weight`, `blocks.0.norm3.weight`, ...), so
Self-Forcing / CausVid / LongLive checkpoints load by stripping prefixes; diffusers names are
mapped in `checkpoints.py`.

Streaming differences from the reference network:
* timesteps are per latent frame: `sigma [B, F]` -> modulation `[B, F, 6, dim]`;
* self-attention asks an `AttentionView` (engine/models/attention.py) for rotated queries and for the keys and
  values to attend to: committed frames from the KV cache plus this call's in-flight frames;
* cross-attention keys/values are computed once per prompt (`embed_text` -> `TextKV`).
* the forward is `enter` (patch embedding, per-frame conditioning) -> `run` (blocks and head, per
  token) -> `leave` (unpatchify), so a sequence-parallel wrapper runs `run` on a slice of the
  tokens (engine/models/tokens.py).

The residual stream is float32 (as in Wan's reference code); linear layers run in the weights'
dtype; norms, modulation and the time embedding run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.config import WanConfig
from engine.models.attention import AttentionView
from engine.models.layers import linear, scaled_normal
from engine.models.tokens import Tokens

# Parameters kept in float32 when the model is cast to bf16 (small, numerically sensitive).
FLOAT32_PARAMS = ("time_embedding", "time_projection", "fps_", "modulation", "norm")
TRAINED_FPS = 16  # SkyReels-V2's fps embedding: index 0 for 16 fps, 1 for anything else (24)


@dataclass
class TextKV:
    """Cross-attention keys and values of one prompt batch, per layer: `[B, L_text, H, Dh]`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def tokens(self) -> int:
        """Text tokens each query attends to (for FLOP counts)."""
        return self.keys[0].shape[1]

    @staticmethod
    def stack(*texts: TextKV) -> TextKV:
        """Concatenate prompts along the batch (e.g. [cond, uncond] for guidance in one forward)."""
        return TextKV(
            keys=[torch.cat(parts) for parts in zip(*(t.keys for t in texts))],
            values=[torch.cat(parts) for parts in zip(*(t.values for t in texts))],
        )


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding `[..., dim]` (cos first), computed in float64 as Wan does."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads at once), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class Attention(nn.Module):
    """q, k, v, o projections with RMSNorm over the full width on queries and keys."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    @staticmethod
    def core(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None) -> torch.Tensor:
        # q: [B, N, H, Dh]; keys/values: [B, M, H, Dh]; mask: bool [N, M], [B, 1, N, M] (one per stream
        # sharing the forward) or None -> [B, N, H, Dh]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None) -> torch.Tensor:
        return linear(self.o, self.core(q, keys, values, mask).flatten(2))  # [B, N, dim]

    def attend_short(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`attend` for few keys (a prompt): on CPUs the plain kernel is faster than the flash one
        (4x at 8 keys, forward + backward); elsewhere SDPA picks."""
        if q.device.type != "cpu":
            return self.attend(q, keys, values)
        with sdpa_kernel(SDPBackend.MATH):
            return self.attend(q, keys, values)


class SelfAttention(Attention):
    def forward(self, x: torch.Tensor, layer: int, kv: AttentionView) -> torch.Tensor:
        # x: [B, N, dim] -> q, k, v: [B, N, H, Dh]
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(linear(self.k, x)).unflatten(-1, (self.heads, -1))
        v = linear(self.v, x).unflatten(-1, (self.heads, -1))
        out = self.core(*kv.context(layer, q, k, v))
        return linear(self.o, kv.output(layer, out).flatten(2))


class CrossAttention(Attention):
    def project_text(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # context: [B, L, dim] -> k, v: [B, L, H, Dh]
        k = self.norm_k(linear(self.k, context)).unflatten(-1, (self.heads, -1))
        v = linear(self.v, context).unflatten(-1, (self.heads, -1))
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x `[B, N, dim]`; keys/values `[P, L, H, Dh]` with P = 1 (shared prompt), B, or B * G:
        G prompts per sample, each for one of G equal, consecutive groups of tokens (e.g. one
        prompt per block when training prompt switches in one forward)."""
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (self.heads, -1))  # [B, N, H, Dh]
        B, N = q.shape[:2]
        prompts = keys.shape[0]
        if prompts == 1 and B > 1:
            keys, values = keys.expand(B, -1, -1, -1), values.expand(B, -1, -1, -1)
        elif prompts != B:
            if prompts % B or N % (prompts // B):
                raise ValueError(f"{prompts} prompts cannot be spread over {B} samples of {N} tokens")
            grouped = q.reshape(prompts, N * B // prompts, *q.shape[2:])
            return self.attend_short(grouped, keys, values).reshape(B, N, -1)
        return self.attend_short(q, keys, values)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    # x: [B, F*T, dim] float32; shift/scale: [B, F, dim] -> per-frame affine, [B, F*T, dim]
    x = x.unflatten(1, (frames, -1))
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def _gate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    # residual update x + y * gate with a per-frame gate [B, F, dim]
    y = y.float().unflatten(1, (frames, -1)) * gate[:, :, None]
    return x + y.flatten(1, 2)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = scaled_normal(1, 6, cfg.dim, divisor=cfg.dim**0.5)

    def attention_input(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The timestep-modulated input of self-attention, `[B, F*T, dim]` (what TeaCache watches)."""
        shift, scale = (self.modulation.float()[:, None, :2] + e[:, :, :2]).unbind(2)
        return _modulate(self.norm1(x), shift, scale, e.shape[1])

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        layer: int,
        kv: AttentionView,
    ) -> torch.Tensor:
        # x: [B, F*T, dim] float32; e: [B, F, 6, dim] float32 (projected time embedding)
        frames = e.shape[1]
        _, _, gate, ffn_shift, ffn_scale, ffn_gate = (self.modulation.float()[:, None] + e).unbind(2)
        # 1. Self-attention over committed context + in-flight frames
        y = self.self_attn(self.attention_input(x, e), layer, kv)
        x = _gate(x, y, gate, frames)
        # 2. Cross-attention to the prompt (ungated)
        x = x + self.cross_attn(self.norm3(x.float()), text_k, text_v).float()
        # 3. Feed-forward
        y = linear(self.ffn[0], _modulate(self.norm2(x), ffn_shift, ffn_scale, frames))
        y = self.ffn[2](self.ffn[1](y))
        return _gate(x, y, ffn_gate, frames)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = scaled_normal(1, 2, cfg.dim, divisor=cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x: [B, F*T, dim]; e: [B, F, dim] (time embedding before projection)
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return linear(self.head, _modulate(self.norm(x), shift, scale, e.shape[1]))


class WanModel(nn.Module):
    """flow = model(latents [B, C, F, H, W], sigma [B, F], text, kv, fps) with flow = noise - x0."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.fps_embedding:
            self.fps_embedding = nn.Embedding(2, cfg.dim)
            self.fps_projection = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def cast(self, dtype: torch.dtype) -> WanModel:
        """Cast weights to `dtype`, keeping norms, modulation and the time embedding in float32."""
        for name, param in self.named_parameters():
            keep = any(part in name for part in FLOAT32_PARAMS)
            param.data = param.data.to(torch.float32 if keep else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def embed_text(self, context: torch.Tensor) -> TextKV:
        """Cross-attention K/V for text states `[B, L, text_dim]`; compute once per prompt."""
        ctx = linear(self.text_embedding[0], context)
        ctx = self.text_embedding[2](self.text_embedding[1](ctx))  # [B, L, dim]
        pairs = [block.cross_attn.project_text(ctx) for block in self.blocks]
        return TextKV(keys=[k for k, _ in pairs], values=[v for _, v in pairs])

    def time_modulation(self, sigma: torch.Tensor, fps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma `[B, F]` -> (e `[B, F, dim]`, e6 `[B, F, 6, dim]`), float32. Wan's t = 1000 * sigma."""
        e = self.time_embedding(timestep_embedding(1000.0 * sigma, self.cfg.freq_dim))
        e6 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))
        if self.cfg.fps_embedding:
            if fps is None:
                raise ValueError("this model is conditioned on the frame rate: pass fps")
            index = torch.full((sigma.shape[0],), 0 if fps == TRAINED_FPS else 1, device=sigma.device)
            e6 = e6 + self.fps_projection(self.fps_embedding(index)).unflatten(-1, (6, self.cfg.dim))[:, None]
        return e, e6

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """Patch embedding: latents `[B, C, F, H, W]` -> tokens `[B, F*h*w, dim]` float32."""
        return self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).float()

    def forward(
        self, latents: torch.Tensor, sigma: torch.Tensor, text: TextKV, kv: AttentionView, fps: int | None = None
    ) -> torch.Tensor:
        return self.leave(self.run(self.enter(latents, sigma, text, fps), text, kv), latents.shape)

    def enter(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextKV, fps: int | None = None) -> Tokens:
        """Latents `[B, C, F, H, W]` -> tokens `[B, F*h*w, dim]`, one group per frame: (e `[B, F, dim]`,
        e6 `[B, F, 6, dim]`). `text` is unused here (MAGI-1's `enter` reads it)."""
        B, _, frames = latents.shape[:3]
        if sigma.shape != (B, frames):
            raise ValueError(f"sigma must be [B, F] = {(B, frames)}, got {tuple(sigma.shape)}")
        return Tokens(self.embed(latents), self.time_modulation(sigma, fps))

    def run(self, tokens: Tokens, text: TextKV, kv: AttentionView) -> torch.Tensor:
        """The blocks and the head over `tokens` (all of a forward's, or a slice): `[B, n, C*ph*pw]`."""
        e, e6 = tokens.per_group
        x = tokens.x
        for layer, block in enumerate(self.blocks):
            x = block(x, e6, text.keys[layer], text.values[layer], layer, kv)
        return self.head(x, e)

    def leave(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Every token's head output `[B, F*h*w, C*ph*pw]` -> flow `[B, C, F, H, W]` (`shape`: the latents')."""
        B, _, frames, height, width = shape
        _, ph, pw = self.cfg.patch_size
        out = out.reshape(B, frames, height // ph, width // pw, ph, pw, -1)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, -1, frames, height, width).float()
