"""A model family is one unit: only its own module (engine/families/<name>.py) branches on it.

Everything else asks `family_of(cfg)` what the family does (build, seed, load, rope, text K/V,
FLOPs, cache signals), so adding a family touches its own files and one registry line.

pytest tests/project/test_families.py
"""

import ast
from pathlib import Path

import pytest
import torch

from engine.config import MagiConfig, WanConfig
from engine.families import FAMILIES, family_of, forward_flops
from engine.models.flops import magi_forward_flops, wan_forward_flops
from launch.presets import PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[2]
FAMILY_FILES = ROOT / "engine" / "families"
NAMED_AXES = {
    "spacing": "a timestep spacing named after MAGI-1's (engine/plan/sigmas.py)",
    "variant": "FlowCache's variants, named after the models of its paper (cache/flowcache.py)",
    "kind": "a latent space: the VAE's kind (engine/config.py, engine/loading.py)",
    "layout": "a checkpoint's file layout (engine/models/checkpoints/)",
}
"""Config values named after a family that are not the family: comparing them is not branching on it."""


def _name(node) -> str | None:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None


def family_branches(source: str) -> list[int]:
    """Lines comparing a model family's name: `x.family == ...`, or a family's name against anything
    but a NAMED_AXES value."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = {_name(o) for o in operands}
        constants = [c for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
        literals = {c.value for c in constants if isinstance(c.value, str)}
        if "family" in names or (literals & set(FAMILIES) and not names & set(NAMED_AXES)):
            found.append(node.lineno)
    return found


def test_only_family_modules_branch_on_a_family():
    violations = []
    for package in ("engine", "cache", "parallel", "launch"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.parent == FAMILY_FILES:
                continue
            lines = family_branches(path.read_text())
            violations += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    assert not violations, "family branches outside engine/families/ (ask family_of(cfg)):\n" + "\n".join(violations)


def test_the_check_sees_a_branch():
    assert family_branches('if cfg.family == "magi":\n    pass') == [1]
    assert family_branches('x = a if preset.model.family != "wan" else b') == [1]
    assert family_branches('if name in ("magi", "x"):\n    pass') == [1]
    assert family_branches('if cfg.spacing == "magi":\n    pass') == []


def test_every_preset_has_a_registered_family():
    for name in PRESETS:
        cfg = get_preset(name).model
        assert family_of(cfg).name == cfg.family, name
    assert {WanConfig.family, MagiConfig.family} == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_builds_its_own_network_and_counts_it(family):
    spec = FAMILIES[family]
    preset = get_preset(spec.tiny_preset)
    with torch.device("meta"):
        model = spec.new_model(preset.model)
    assert model.cfg is preset.model
    own = wan_forward_flops if family == "wan" else magi_forward_flops
    assert forward_flops(preset.model, 48, 96, 16) == own(preset.model, 48, 96, 16) > 0
    for switch in spec.stand_in_keeps:
        assert hasattr(preset.model, switch), f"{family}: stand-in switch {switch} is not a model field"
