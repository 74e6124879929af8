"""Every declared dependency earns its place: arcade's code imports it, or it is named below with
the reason it is declared without an import.

pytest tests/project/test_dependencies.py
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"pillow": "PIL"}
"""Distributions imported under another name."""
WITHOUT_IMPORT = {
    "accelerate": "diffusers' from_pretrained loads with it (low_cpu_mem_usage); its offload hooks lack prefetch",
    "sentencepiece": "transformers' T5/umT5 tokenizers load with it (--text-encoder folders)",
}


def _declared() -> list[str]:
    """[project] dependencies of pyproject.toml (read by pattern: tomllib is Python 3.11+)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    specs = re.findall(r'^\s*"([^"]+)"', block, re.M)
    return [re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower() for spec in specs]


def _imported() -> set[str]:
    found = set()
    for package in ("engine", "cache", "parallel", "launch"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found


def test_each_dependency_is_imported_or_says_why_not():
    imported = _imported()
    unused = [d for d in _declared() if IMPORT_NAMES.get(d, d) not in imported and d not in WITHOUT_IMPORT]
    assert not unused, f"declared but imported nowhere (drop them or say why in WITHOUT_IMPORT): {unused}"
    assert "einops" not in _declared()
    stale = [d for d in WITHOUT_IMPORT if d not in _declared() or IMPORT_NAMES.get(d, d) in imported]
    assert not stale, f"WITHOUT_IMPORT names a dependency that is imported or no longer declared: {stale}"
