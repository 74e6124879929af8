"""The package layering holds: every module of engine/, cache/, parallel/ and launch/ has a rank,
and imports only modules of its own rank or below; no two modules import each other, directly or
round a loop.

engine/ is the loop and pure parts; caching (cache/), parallelism (parallel/) and assembly
(launch/) wrap it from outside and are never imported by it. Imports count wherever they stand:
inside functions and under `if TYPE_CHECKING:` too (a type-only import is still a dependency).
The one exception: the `-m` entry shims engine/generate.py and engine/stream.py import launch/
under `if __name__ == "__main__":` only.

pytest tests/project/test_layering.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "cache", "parallel", "launch")
RANKS = [
    # bottom: what every layer may use; none of it imports a model, loader or runtime
    ("engine.config", 0),
    ("engine.argparsing", 0),
    ("engine.devices", 0),
    ("engine.footprint", 0),
    ("engine.weight_paths", 0),
    ("engine.media", 0),  # images and clips read and checked, live frame feeds (numpy, Pillow, PyAV only)
    ("engine.models", 1),  # networks, checkpoint readers, text encoder, VAE: pure math and files
    ("engine.plan", 2),  # which block gets which denoising step, when
    ("engine.sampling", 3),  # noise, solvers, guidance
    ("engine.runtime", 4),  # KV cache, views, the executor, sessions
    ("engine.serving", 5),  # live streams, the server, the client
    ("engine.demo", 6),  # the shipped demo model: its scenes, vocabulary, codec, training
    ("engine.eval", 7),  # measures of generated videos (reads the demo's scenes)
    ("engine.families", 8),  # what differs between model families, one module each
    ("engine.loading", 8),  # the parts of a pipeline from a preset's weights
    ("engine.generate", 9),  # `-m` entry points and the client shim
    ("engine.stream", 9),
    ("engine.client", 9),
    ("engine", 9),  # the package's __init__
    ("cache", 10),  # feature-caching policies (never parallel/)
    ("parallel", 10),  # exchanges between ranks (never cache/)
    ("launch", 11),  # the composition root: presets, commands
    ("launch.bench", 12),  # `-m launch.bench`: imports its benchmarks by name, on demand
    ("launch.benchmarks", 12),
]
FORBIDDEN = {"cache": {"parallel"}, "parallel": {"cache"}}
"""Peers of the same rank that must not import each other."""
ENTRY_SHIMS = {"engine/generate.py", "engine/stream.py"}
"""`python -m engine.generate` / `-m engine.stream` hand over to launch/ under `__main__` only."""


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module path, line, inside `if __name__ == "__main__"`) of a file: every import,
    in functions and under `if TYPE_CHECKING:` included."""
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


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def rank(module: str) -> int | None:
    """The rank of the longest entry of RANKS that is `module` or a package holding it."""
    matches = [(len(name), r) for name, r in RANKS if module == name or module.startswith(name + ".")]
    return max(matches)[1] if matches else None


def _project_edges(modules: dict[str, Path]):
    """(importer, imported project module, line) for every import that is not an entry shim's."""
    for importer, path in modules.items():
        relative = path.relative_to(ROOT).as_posix()
        for imported, line, under_main in _imports(path):
            if imported.split(".")[0] in PACKAGES and not (relative in ENTRY_SHIMS and under_main):
                yield importer, imported, line


def test_every_module_has_a_rank():
    unranked = [name for name in _modules() if rank(name) is None]
    assert not unranked, "modules without a rank in RANKS: " + ", ".join(unranked)


def test_imports_point_down_only():
    violations = []
    for importer, imported, line in _project_edges(_modules()):
        forbidden = FORBIDDEN.get(importer.split(".")[0], set())
        if rank(imported) > rank(importer) or imported.split(".")[0] in forbidden:
            violations.append(f"{importer}:{line} (rank {rank(importer)}) imports {imported} (rank {rank(imported)})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def _owner(imported: str, modules: dict[str, Path]) -> str | None:
    """The module file `imported` names (`from engine.x import y` names engine.x)."""
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported or None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One loop of the graph, as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_round_a_loop():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for importer, imported, _ in _project_edges(modules):
        owner = _owner(imported, modules)
        if owner is not None and owner != importer and not modules[owner].name == "__init__.py":
            edges.setdefault(importer, set()).add(owner)
    cycle = find_cycle(edges)
    assert cycle is None, "modules importing each other: " + " -> ".join(cycle)


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an engine module importing cache/ (under TYPE_CHECKING too) is caught,
    and a loop is found (guards against a checker that finds nothing because it reads nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nfrom cache.skip import CacheSkip\nif TYPE_CHECKING:\n    from launch.build import X\n"
        "if __name__ == '__main__':\n    import launch\n"
    )
    found = _imports(bad)
    assert ("cache.skip", 2, False) in found and ("launch.build", 4, False) in found and ("launch", 6, True) in found
    assert rank("cache.skip") > rank("engine.runtime.kv") and rank("engine.loading") > rank("engine.demo.vocab")
    assert rank("engine.runtime.kv") > rank("engine.models.wan") and rank("launch.benchmarks.kv") > rank("launch.cli")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
