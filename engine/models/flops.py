"""Analytic FLOPs of one transformer forward (Wan, or MAGI-1 below) (multiply-add = 2 FLOPs), per guidance branch.

`engine.families.forward_flops(cfg, ...)` picks the one of the config's family.

Per layer, with Nq query tokens, Nk key tokens (committed context + the call's own), L text
tokens, width d and FFN width f: self-attention projections 8 Nq d^2, attention 4 Nq Nk d,
cross-attention projections (q, o; text K/V are cached per prompt) 4 Nq d^2 and attention
4 Nq L d, feed-forward 4 Nq d f. Patch embedding and head are added; norms and modulation are
elementwise and left out.
"""

from __future__ import annotations

import math

from engine.config import MagiConfig, WanConfig


def wan_forward_flops(cfg: WanConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = (
        8 * query_tokens * d * d
        + 4 * query_tokens * key_tokens * d
        + 4 * query_tokens * d * d
        + 4 * query_tokens * text_tokens * d
        + 4 * query_tokens * d * f
    )
    patch = math.prod(cfg.patch_size)
    edges = 2 * query_tokens * d * (cfg.in_channels * patch + cfg.out_channels * patch)
    return cfg.num_layers * per_layer + edges


def magi_forward_flops(cfg: MagiConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
    """MAGI-1: q and qx (2 * 2 Nq d^2), GQA k and v (2 * 2 Nq d kv), attention to Nk keys and to
    L caption tokens (4 Nq Nk d + 4 Nq L d), output projection from 2d (4 Nq d^2), MLP
    (2 Nq d f per matrix; SwiGLU's fc1 is twice as wide)."""
    d, f, n = cfg.dim, cfg.ffn_dim, query_tokens
    kv = cfg.kv_heads * cfg.head_dim
    mlp = (3 if cfg.gated_linear_unit else 2) * 2 * n * d * f
    per_layer = 4 * n * d * d + 4 * n * d * kv + 4 * n * key_tokens * d + 4 * n * text_tokens * d + 4 * n * d * d + mlp
    patch = math.prod(cfg.patch_size)
    edges = 2 * n * d * (cfg.network_in_channels * patch) * 2
    return cfg.num_layers * per_layer + edges
