"""The code passes the project's lint and format rules (pyproject.toml [tool.ruff]).

pytest tests/project/test_style.py
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["engine", "launch", "parallel", "cache", "tests"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PACKAGES], cwd=ROOT, capture_output=True, text=True)


def test_lint():
    result = _ruff("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_format():
    result = _ruff("format", "--check")
    assert result.returncode == 0, "run `ruff format engine launch parallel cache tests`:\n" + result.stdout
