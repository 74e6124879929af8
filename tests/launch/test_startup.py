"""A command imports what it needs when it needs it: the demo never loads transformers or diffusers.

transformers (seconds of import time) loads only with a umT5 text encoder, diffusers only with a
Wan VAE; the demo preset encodes prompts with its own vocabulary and decodes with its patch codec,
so neither its entry points nor its whole build path may import them. Nor torch's compiler stack,
which only --compile needs. `python -m launch.bench
startup` measures the seconds; this checks the modules, which hold under any load.

pytest tests/launch/test_startup.py
"""

import json
import subprocess
import sys

HEAVY = ("transformers", "diffusers", "torch._dynamo", "sympy")
"""Seconds of imports each: the text encoder's and the VAE's libraries, and torch's compiler stack
(which arithmetic on meta tensors pulls in: a model is sized on the meta device first)."""
BUILD_DEMO = """
import json, sys
import engine.generate, engine.stream
import launch.generate, launch.stream
{build}
print(json.dumps(sorted(h for h in {heavy!r} if h in sys.modules)))
"""
DEMO_SESSION = """
import torch
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.presets import get_preset
session = build_session(get_preset("demo"), WeightPaths(), torch.device("cpu"), torch.float32)
frames = [f for _, f in session.run("a red circle moving left", blocks=1, seed=0).frames()]
assert frames, "the demo decoded no frame"
"""


def _heavy_imported(build: str) -> list[str]:
    script = BUILD_DEMO.format(build=build, heavy=set(HEAVY))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_entry_points_import_no_text_encoder_or_vae_library():
    assert _heavy_imported("") == []


def test_the_demo_builds_and_decodes_without_them():
    assert _heavy_imported(DEMO_SESSION) == []


def test_the_check_sees_them():
    """The check itself: a module that imports one of them is seen (a checker that reads nothing
    would pass the tests above); diffusers, the quicker of the two to import."""
    assert "diffusers" in _heavy_imported("import diffusers")
    assert "torch._dynamo" in _heavy_imported("import torch._dynamo")
