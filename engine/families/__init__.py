"""Model families, one module each: what differs between Wan and MAGI-1, in one place per family.

May import: every engine layer below it (models, plan, sampling, runtime); never demo/, eval/,
serving/ or engine.loading. Main entry points: `family_of(cfg)` (the family of a model config),
`forward_flops`, and `base.Family` (what a family says). Adding a family: its module here, its
model and checkpoint files under engine/models/, and one line in FAMILIES.
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.families.base import Family
from engine.families.magi import MAGI
from engine.families.wan import WAN

FAMILIES: dict[str, Family] = {family.name: family for family in (WAN, MAGI)}


def family_of(cfg: ModelConfig) -> Family:
    """The family of a model config (its `family` name, set by its config class)."""
    return FAMILIES[cfg.family]


def forward_flops(cfg: ModelConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
    """FLOPs of one forward of `cfg`'s network per guidance branch (multiply-add = 2 FLOPs)."""
    return family_of(cfg).forward_flops(cfg, query_tokens, key_tokens, text_tokens)
