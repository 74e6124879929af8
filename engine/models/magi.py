"""The MAGI-1 DiT (`VideoDiTModel`), written for chunk-wise streaming. Pure math: no schedule, no
guidance, no cache policy (engine/magi.py wraps it).

Module names follow the released weights (`videodit_blocks.layers.0.self_attention.linear_qkv.q.weight`,
...), so MAGI-1 shards load without renaming (engine/models/magi_checkpoints.py).

The network, per layer ("parallel attention" with sandwich norms, reference §2.6):
  h = LayerNorm(x)
  a = linear_proj(interleave(self_attention(h), cross_attention(h)))   # both from the same h
  x = x + post_norm_attn(gate_msa * a)
  x = x + post_norm_mlp(gate_mlp * MLP(x))
with only output gates as modulation (soft-capped, one pair per latent frame), GQA self-attention
(24 or 48 query heads over 8 key/value heads), learnable 3-D rotary frequencies on 96 of the 128
channels, and per-chunk captions in cross-attention.

Conventions at the edge: the engine speaks Wan's (sigma in [0, 1], 1 = noise; flow = noise - x0).
MAGI-1's time runs the other way: t = 1 - sigma and its velocity v = x0 - noise, so this model
takes `sigma` and returns `-v`. A frame at sigma = 0 is a committed clean chunk: it is run at
MAGI-1's clean_t = 0.9999 with the null caption, as its K/V were trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MagiConfig
from engine.models.attention import AttentionView
from engine.models.layers import compute_dtype, linear, scaled_normal
from engine.models.tokens import Tokens

CLEAN_T = 0.9999
"""MAGI-1's time of a committed (clean) chunk's K/V pass."""
TIME_SCALE = 1000.0
"""timestep_rescale_factor: the sinusoid sees 1000 * t."""
GATE_SOFTCAP = 1.0
PROJ_GROUPS = 8
"""The output projection's input is interleaved in 8 groups (MAGI-1 was trained with 8-way tensor
parallelism): see `interleave_heads`."""
NULL_CAPTION_TOKENS = 50
"""Tokens of the null caption that cross-attention sees (the reference's null mask)."""
KEPT_CAPTION_TOKEN, DROPPED_CAPTION_TOKEN = -2, -1
"""Rows of the null caption that stand for "a caption is given" / "no caption" in the adaLN path."""

# Parameters kept in float32 when the model is cast to bf16 (MAGI-1's high-precision modules).
FLOAT32_PARAMS = ("x_embedder", "t_embedder", "y_embedder", "final_linear", "rope", "layernorm", "post_norm")


@dataclass
class CaptionKV:
    """Cross-attention K/V of captions, per layer `[P, L, G, Dh]` (G = kv heads), and each
    caption's number of real tokens (the rest is padding that is never attended to)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: tuple[int, ...]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @staticmethod
    def stack(*captions: CaptionKV) -> CaptionKV:
        """Captions along the batch, zero-padded to the longest (padding is never attended to)."""
        width = max(c.keys[0].shape[1] for c in captions)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, 0, 0, width - t.shape[1]))

        return CaptionKV(
            keys=[torch.cat([pad(t) for t in parts]) for parts in zip(*(c.keys for c in captions))],
            values=[torch.cat([pad(t) for t in parts]) for parts in zip(*(c.values for c in captions))],
            lengths=tuple(n for c in captions for n in c.lengths),
        )


@dataclass
class MagiText:
    """What a forward is conditioned on: per batch element a caption (the prompt, or the null
    caption when `dropped`), and the null caption that committed clean chunks always get."""

    caption: CaptionKV
    dropped: tuple[bool, ...]
    null: CaptionKV
    clean_frames: tuple[bool, ...] | None = None
    """Per latent frame of the forward, whether it is a committed clean chunk (host flags, so
    the forward never reads the device to group frames by caption). None: read from sigma."""

    @property
    def batch(self) -> int:
        return self.caption.batch

    @property
    def tokens(self) -> int:
        """Caption tokens a denoising chunk attends to (for FLOP counts)."""
        return self.caption.lengths[0]

    def for_frames(self, clean_frames: tuple[bool, ...]) -> MagiText:
        return MagiText(self.caption, self.dropped, self.null, tuple(clean_frames))


def _runs(flags: tuple[bool, ...]) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal flags: (flag, start, end)."""
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((flags[start], start, i))
            start = i
    return runs


def _flag_map(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """Host flags -> bool tensor `[F]` on `device`, filled there (no host-to-device copy)."""
    return torch.cat(
        [torch.full((end - start,), flag, dtype=torch.bool, device=device) for flag, start, end in _runs(flags)]
    )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[..., dim]` of `t` (cos first), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class LayerNorm1p(nn.LayerNorm):
    """LayerNorm whose stored weight is an offset from 1 (Megatron's apply_layernorm_1p), in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float() + 1, self.bias.float(), self.eps)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t: [...] in MAGI-1's convention -> [..., cond_dim] float32
        return self.mlp(timestep_embedding(TIME_SCALE * t, self.freq_dim)).float()


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(cfg.text_dim, cfg.cond_dim))
        self.null_caption_embedding = scaled_normal(cfg.caption_len, cfg.text_dim, divisor=cfg.text_dim**0.5)

    def adaln_tokens(self) -> torch.Tensor:
        """`[2, cond_dim]`: the adaLN condition for a kept caption (row 0) and a dropped one (row 1)."""
        rows = self.null_caption_embedding[[KEPT_CAPTION_TOKEN, DROPPED_CAPTION_TOKEN]]
        return self.y_proj_adaln(rows.float()).float()


def initial_bands(count: int) -> torch.Tensor:
    """The rotary frequencies MAGI-1 starts training from: 10000^(-i/count)."""
    return 10000.0 ** (-torch.arange(count, dtype=torch.float32) / count)


class MagiRotary(nn.Module):
    """Holds the learnable rotary frequencies (`rope.bands`); the tables live in `MagiRope`."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.bands = nn.Parameter(initial_bands(cfg.rope_bands))


class SelfAndCrossAttention(nn.Module):
    """Self-attention (through the view) and cross-attention to the captions, from one input."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        width, kv_width = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.linear_qkv = _QKV(cfg.dim, width, kv_width, cfg.eps)
        self.linear_kv_xattn = nn.Linear(cfg.dim, 2 * kv_width, bias=False)
        self.linear_proj = nn.Linear(2 * width, cfg.dim, bias=False)
        self.q_layernorm = LayerNorm1p(cfg.head_dim, cfg.eps)
        self.k_layernorm = LayerNorm1p(cfg.head_dim, cfg.eps)
        self.q_layernorm_xattn = LayerNorm1p(cfg.head_dim, cfg.eps)
        self.k_layernorm_xattn = LayerNorm1p(cfg.head_dim, cfg.eps)

    def caption_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption states after y_proj_xattn `[P, L, dim]` -> K, V `[P, L, G, Dh]`."""
        kv = linear(self.linear_kv_xattn, y).unflatten(-1, (self.kv_heads, 2, self.head_dim))
        k, v = kv.unbind(-2)
        return self.k_layernorm_xattn(k).to(v.dtype), v

    def forward(self, h: torch.Tensor, layer: int, view: AttentionView, text: MagiText, clean: tuple[bool, ...]):
        # h: [B, N, dim] (normed); clean: per frame -> [B, N, dim]
        qkv = self.linear_qkv
        q = self.q_layernorm(linear(qkv.q, h).unflatten(-1, (self.heads, -1))).to(h.dtype)
        k = self.k_layernorm(linear(qkv.k, h).unflatten(-1, (self.kv_heads, -1))).to(h.dtype)
        v = linear(qkv.v, h).unflatten(-1, (self.kv_heads, -1))
        core = view.output(layer, _attend(*view.context(layer, q, k, v)))  # [B, N, H, Dh]
        qx = self.q_layernorm_xattn(linear(qkv.qx, h).unflatten(-1, (self.heads, -1))).to(h.dtype)
        cross = _cross_attend(qx, layer, text, clean)  # [B, N, H, Dh]
        return linear(self.linear_proj, interleave_heads(core, cross))


class _QKV(nn.Module):
    """The shared pre-norm and the four projections (q and qx for queries, k and v for keys)."""

    def __init__(self, dim: int, width: int, kv_width: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps)
        self.q = nn.Linear(dim, width, bias=False)
        self.qx = nn.Linear(dim, width, bias=False)
        self.k = nn.Linear(dim, kv_width, bias=False)
        self.v = nn.Linear(dim, kv_width, bias=False)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None) -> torch.Tensor:
    # q: [B, N, H, Dh]; keys/values: [B, M, G, Dh] with H a multiple of G -> [B, N, H, Dh]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)


def _cross_attend(q: torch.Tensor, layer: int, text: MagiText, clean: tuple[bool, ...]) -> torch.Tensor:
    """Each frame attends to the real tokens of its own caption: its batch element's caption, or
    the null caption for clean frames. q `[B, N, H, Dh]`; `clean` per frame, or per group of
    tokens (engine/models/tokens.py), the same for the batch."""
    B, N = q.shape[:2]
    tokens = N // len(clean)
    parts = []
    for is_clean, start, end in _runs(clean):
        caption = text.null if is_clean else text.caption
        span = q[:, start * tokens : end * tokens]
        if caption.batch == 1 or len(set(caption.lengths)) == 1:
            length = caption.lengths[0]
            parts.append(_attend(span, caption.keys[layer][:, :length], caption.values[layer][:, :length]))
        else:  # captions of different lengths along the batch: one call each
            rows = [
                _attend(span[b : b + 1], caption.keys[layer][b : b + 1, :n], caption.values[layer][b : b + 1, :n])
                for b, n in enumerate(caption.lengths)
            ]
            parts.append(torch.cat(rows))
    return torch.cat(parts, dim=1)


def interleave_heads(core: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """`[B, N, H, Dh]` x 2 -> `[B, N, 2 * H * Dh]` in the order linear_proj was trained on:
    heads split into 8 groups, and per group the self-attention heads then the cross-attention
    heads ("sq b (n hn hd) -> sq b (hn n hd)" with n = 2, hn = 8)."""
    B, N, H, Dh = core.shape
    both = torch.stack([core.flatten(2), cross.flatten(2)], dim=2)  # [B, N, 2, H*Dh]
    both = both.unflatten(-1, (PROJ_GROUPS, H * Dh // PROJ_GROUPS))  # [B, N, 2, 8, H*Dh/8]
    return both.transpose(2, 3).flatten(2)


class MLP(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.gated = cfg.gated_linear_unit
        self.layer_norm = nn.LayerNorm(cfg.dim, cfg.eps)
        self.linear_fc1 = nn.Linear(cfg.dim, (2 if self.gated else 1) * cfg.ffn_dim, bias=False)
        self.linear_fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(self.linear_fc1, _norm(self.layer_norm, x))
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        return linear(self.linear_fc2, y)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


class AdaModulate(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cfg.cond_dim, 2 * cfg.dim))

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # condition: [B, F, cond_dim] -> gates (attention, MLP), each [B, F, dim] float32
        gates = self.proj(F.silu(condition).to(compute_dtype(self.proj[0]))).float()
        gates = GATE_SOFTCAP * torch.tanh(gates / GATE_SOFTCAP)
        return gates.chunk(2, dim=-1)


def _gated(x: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    # x: [B, F*T, dim]; gate: [B, F, dim] -> per-frame gating, float32
    return (x.float().unflatten(1, (frames, -1)) * gate[:, :, None]).flatten(1, 2)


class MagiLayer(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.ada_modulate_layer = AdaModulate(cfg)
        self.self_attention = SelfAndCrossAttention(cfg)
        self.self_attn_post_norm = LayerNorm1p(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = LayerNorm1p(cfg.dim, cfg.eps)

    def forward(self, x, condition, layer: int, view: AttentionView, text: MagiText, clean: tuple[bool, ...]):
        # x: [B, F*T, dim] float32; condition: [B, F, cond_dim]
        frames = condition.shape[1]
        gate_attn, gate_mlp = self.ada_modulate_layer(condition)
        h = _norm(self.self_attention.linear_qkv.layer_norm, x)
        attn = self.self_attention(h.to(compute_dtype(self.mlp.linear_fc1)), layer, view, text, clean)
        x = x + self.self_attn_post_norm(_gated(attn, gate_attn, frames))
        return x + self.mlp_post_norm(_gated(self.mlp(x), gate_mlp, frames))


class VideoDiTBlocks(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.layers = nn.ModuleList(MagiLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = LayerNorm1p(cfg.dim, cfg.eps)


class FinalLinear(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.network_in_channels, bias=False)


class MagiModel(nn.Module):
    """flow = model(latents [B, C, F, H, W], sigma [B, F], text, view) with flow = noise - x0."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = nn.Conv3d(
            cfg.network_in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = CaptionEmbedder(cfg)
        self.rope = MagiRotary(cfg)
        self.videodit_blocks = VideoDiTBlocks(cfg)
        self.final_linear = FinalLinear(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers (what layer-output hooks attach to)."""
        return self.videodit_blocks.layers

    def cast(self, dtype: torch.dtype) -> MagiModel:
        """Cast weights to `dtype`, keeping the embedders, norms, rope and final linear in float32."""
        for name, param in self.named_parameters():
            keep = any(part in name for part in FLOAT32_PARAMS) or name.endswith("layer_norm.weight") \
                or name.endswith("layer_norm.bias")  # fmt: skip
            param.data = param.data.to(torch.float32 if keep else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.videodit_blocks.layers[0].mlp.linear_fc1)

    # -- conditioning, computed once per caption ----------------------------------------------------

    def embed_caption(self, states: torch.Tensor, lengths: tuple[int, ...]) -> CaptionKV:
        """Cross-attention K/V of T5 states `[P, L, text_dim]` with `lengths` real tokens each."""
        y = self.y_embedder.y_proj_xattn(states.float()).to(self.dtype)  # [P, L, dim]
        pairs = [layer.self_attention.caption_kv(y) for layer in self.blocks]
        return CaptionKV([k for k, _ in pairs], [v for _, v in pairs], tuple(lengths))

    def null_caption(self) -> CaptionKV:
        """The learned null caption's K/V; its first NULL_CAPTION_TOKENS rows are attended to."""
        null = self.y_embedder.null_caption_embedding
        return self.embed_caption(null[None], (min(NULL_CAPTION_TOKENS, null.shape[0]),))

    # -- the forward --------------------------------------------------------------------------------

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """Patch embedding: latents `[B, C, F, H, W]` -> tokens `[B, F*h*w, dim]` float32."""
        x = latents.float()
        if self.cfg.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        x = x * self.cfg.x_rescale_factor
        weight = self.x_embedder.weight
        return F.conv3d(x.to(weight.dtype), weight, stride=self.cfg.patch_size).flatten(2).transpose(1, 2).float()

    def condition(self, sigma: torch.Tensor, dropped: torch.Tensor, step_size: torch.Tensor | None) -> torch.Tensor:
        """Per-frame adaLN condition `[B, F, cond_dim]`: time embedding + caption token (+ step size)."""
        t = torch.where(sigma == 0, torch.full_like(sigma, CLEAN_T), 1.0 - sigma)
        condition = self.t_embedder(t)
        if self.cfg.distill:
            if step_size is None:
                raise ValueError("a distilled MAGI-1 model needs the step size of each frame")
            condition = condition + self.t_embedder(step_size.to(sigma.dtype))
        tokens = self.y_embedder.adaln_tokens()  # [2, cond_dim]
        return condition + tokens[dropped.long()]

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: MagiText,
        kv: AttentionView,
        fps: int | None = None,
        step_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`step_size [B, F]` (distilled models): the shortcut step each frame takes."""
        tokens = self.enter(latents, sigma, text, fps, step_size)
        return self.leave(self.run(tokens, text, kv), latents.shape)

    def enter(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: MagiText,
        fps: int | None = None,
        step_size: torch.Tensor | None = None,
    ) -> Tokens:
        """Latents `[B, C, F, H, W]` -> tokens `[B, F*h*w, dim]`, one group per frame: the adaLN
        condition `[B, F, cond_dim]` and whether the frame is a committed clean chunk."""
        B, _, frames = latents.shape[:3]
        if sigma.shape != (B, frames):
            raise ValueError(f"sigma must be [B, F] = {(B, frames)}, got {tuple(sigma.shape)}")
        # committed chunks (sigma 0) run at clean_t and attend to the null caption; the adaLN
        # caption token is the pass's (kept or dropped), as in the reference
        clean = text.clean_frames if text.clean_frames is not None else tuple((sigma[0] == 0).tolist())
        if len(clean) != frames:
            raise ValueError(f"{len(clean)} clean-frame flags for {frames} frames")
        dropped = _flag_map(text.dropped, sigma.device).expand(B)[:, None].expand(B, frames)
        return Tokens(self.embed(latents), (self.condition(sigma, dropped, step_size),), (clean,))

    def run(self, tokens: Tokens, text: MagiText, kv: AttentionView) -> torch.Tensor:
        """The layers and the final linear over `tokens` (all of a forward's, or a slice)."""
        (condition,), (clean,) = tokens.per_group, tokens.flags
        x = tokens.x
        for layer, block in enumerate(self.blocks):
            x = block(x, condition, layer, kv, text, clean)
        out = linear(self.final_linear.linear, self.videodit_blocks.final_layernorm(x)).float()
        # [B, n, ph*pw*C_net] with the channel innermost -> the first out_channels of each patch
        # pixel (what _unpatchify keeps; cut here, a sequence-parallel gather carries no more)
        cfg = self.cfg
        return out.unflatten(-1, (-1, cfg.network_in_channels))[..., : cfg.out_channels].flatten(-2)

    def leave(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Every token's output -> flow `[B, C_out, F, H, W]` in the engine's convention."""
        return -self._unpatchify(out, *shape[2:]) / self.cfg.x_rescale_factor

    def _unpatchify(self, out: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        # out: [B, F*h*w, C*pt*ph*pw] -> v [B, C_out, F, H, W] (the first out_channels channels)
        _, ph, pw = self.cfg.patch_size
        B = out.shape[0]
        out = out.reshape(B, frames, height // ph, width // pw, ph, pw, -1)  # channel innermost
        out = out.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, -1, frames, height, width)
        return out[:, : self.cfg.out_channels]
