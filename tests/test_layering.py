"""The package layering holds: engine/ is the loop and pure parts; caching (cache/), parallelism
(parallel/) and assembly (launch/) wrap it from outside and are never imported by it.

pytest tests/test_layering.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engine": {"cache", "parallel", "launch"},
    "cache": {"launch", "parallel"},
    "parallel": {"launch", "cache"},
}
ENTRY_SHIMS = {"engine/generate.py", "engine/stream.py"}
"""`python -m engine.generate` / `-m engine.stream` hand over to launch/ under `__main__` only."""
SUBPACKAGE_ORDER = ["models", "plan", "sampling", "runtime", "serving"]
"""Inside engine/, a sub-package imports only those before it (demo and eval stand apart)."""


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported top-level module path, line, inside `if __name__ == "__main__"`) of a file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, under_main: bool):
        for child in ast.iter_child_nodes(node):
            main = under_main or (isinstance(child, ast.If) and "__main__" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, main) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, main))
            visit(child, main)

    visit(tree, False)
    return found


def _files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_engine_imports_none_of_its_wrappers():
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in _files(package):
            relative = path.relative_to(ROOT).as_posix()
            for module, line, under_main in _imports(path):
                top = module.split(".")[0]
                if top in forbidden and not (relative in ENTRY_SHIMS and under_main):
                    violations.append(f"{relative}:{line} imports {module}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_engine_subpackages_import_downward_only():
    violations = []
    for path in _files("engine"):
        parts = path.relative_to(ROOT / "engine").parts
        if len(parts) < 2 or parts[0] not in SUBPACKAGE_ORDER:
            continue
        rank = SUBPACKAGE_ORDER.index(parts[0])
        for module, line, _ in _imports(path):
            pieces = module.split(".")
            if pieces[0] == "engine" and len(pieces) > 1 and pieces[1] in SUBPACKAGE_ORDER:
                if SUBPACKAGE_ORDER.index(pieces[1]) > rank:
                    violations.append(f"engine/{'/'.join(parts)}:{line} imports {module}")
    assert not violations, "upward imports inside engine/:\n" + "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an engine module importing cache/ is caught (guards against a checker
    that finds nothing because it reads nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom cache.skip import CacheSkip\nif __name__ == '__main__':\n    import launch\n")
    found = _imports(bad)
    assert ("cache.skip", 2, False) in found and ("launch", 4, True) in found
