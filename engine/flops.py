"""Analytic FLOPs of one Wan transformer forward (multiply-add = 2 FLOPs), per guidance branch.

Per layer, with Nq query tokens, Nk key tokens (committed context + the call's own), L text
tokens, width d and FFN width f: self-attention projections 8 Nq d^2, attention 4 Nq Nk d,
cross-attention projections (q, o; text K/V are cached per prompt) 4 Nq d^2 and attention
4 Nq L d, feed-forward 4 Nq d f. Patch embedding and head are added; norms and modulation are
elementwise and left out.
"""

from __future__ import annotations

import math

from engine.config import WanConfig


def forward_flops(cfg: WanConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
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
