"""The README and docs/: links that lead somewhere, a quick start that runs as written, a Python API
example whose printed numbers are what it says, and no machine paths.

pytest tests/project/test_docs.py

Fenced code and inline code are not scanned for links. Anchors follow GitHub's rule for heading
ids: lower case, every character that is not a letter, digit, mark, `_`, space or `-` dropped,
spaces turned into `-`, and a repeated id numbered -1, -2, ...
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import unicodedata
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = ("serving", "parallel", "caching", "speed", "checkpoints", "demo-model", "correctness", "measured",
             "pixels", "video-in")  # fmt: skip
SETUP = ("python3.11 -m venv", ". .venv/bin/activate", "pip install")
"""Quick-start lines not run here: they make and fill the environment this suite already runs in."""

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]+`")  # a code span may wrap onto the next line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()  # a link's text stays
    kept = (c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> Iterator[str]:
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        yield slug if count == 0 else f"{slug}-{count}"


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and (file.suffix != ".md" or anchor not in set(anchors(file))):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def fenced_block(marker: str) -> str:
    """The fenced block between `<!-- marker -->` and `<!-- /marker -->` in the README."""
    text = README.read_text()
    found = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```\s*<!-- /{marker} -->", text, re.S)
    assert found, f"README.md has no fenced block marked <!-- {marker} --> ... <!-- /{marker} -->"
    return found.group(1)


def commands(block: str) -> list[str]:
    """Shell lines of a block without comments; `a && b` is two commands."""
    parts = (shlex.split(part, comments=True) for line in block.splitlines() for part in line.split(" && "))
    return [shlex.join(words) for words in parts if words]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "python", f"a quick-start command this test cannot run: {command}"
    return [sys.executable, *words[1:]]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_reaches_a_file_and_every_anchor_a_heading(page):
    assert broken_links(page) == [], page.name


def test_the_link_check_catches_a_broken_link_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Title: one (two)\n\n## Title: one (two)\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#title-one-two-1) [x](nothere.md) [y](a.md#title) `[z](skip.md)`\n")
    broken = broken_links(page)
    assert [b.split(":")[0] for b in broken] == ["nothere.md", "a.md#title"], broken


def test_docs_has_every_page_and_the_readme_links_each():
    linked = set(LINK.findall(_prose(README.read_text())))
    for name in DOC_PAGES:
        assert (ROOT / "docs" / f"{name}.md").exists(), f"docs/{name}.md is missing"
        assert f"docs/{name}.md" in linked, f"README.md does not link docs/{name}.md"


def test_no_page_names_a_machine_path():
    pattern = re.compile(r"(?<![\w.])/(work|home|root|Users)/")
    for page in PAGES:
        hits = [line for line in page.read_text().splitlines() if pattern.search(line)]
        assert hits == [], f"{page.name} names machine paths: {hits}"


def test_the_quick_start_is_what_ci_runs():
    """.ci/run installs and runs what the README's quick start says, command for command."""
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands(fenced_block("quick-start")):
        assert command in ci, f"README's quick start runs `{command}`, .ci/run does not"
    readme = README.read_text()
    for command in ("python -m pytest", 'python -m pytest -m "not slow"'):
        assert f"\n{command} " in readme, f"README.md should name `{command}`"


def test_the_quick_start_runs_as_written(tmp_path):
    """Every quick-start command but the set-up lines (SETUP), in a fresh folder."""
    run = [c for c in commands(fenced_block("quick-start")) if not c.startswith(SETUP)]
    assert run, "the quick start has no command to run"
    for command in run:
        result = subprocess.run(_argv(command), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stderr[-3000:]}"
        words = shlex.split(command)
        if "--out" in words:
            out = tmp_path / words[words.index("--out") + 1]
            assert out.exists() and out.stat().st_size > 0, f"`{command}` wrote nothing to {out}"


def test_watching_it_live_serves_the_viewer_page(tmp_path):
    """The watch-live command as written, plus `--port 0`: a fixed port may be taken on a shared
    machine. It serves the viewer page and stops on SIGTERM."""
    (command,) = commands(fenced_block("watch-live"))
    process = subprocess.Popen([*_argv(command), "--port", "0"], cwd=tmp_path, env=_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        lines, found = [], None
        for line in process.stdout:
            lines.append(line)
            if found := re.search(r"serving (http://\S+)", line):
                break
        assert found, "".join(lines)[-3000:]
        with urllib.request.urlopen(found.group(1), timeout=60) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_python_api_example_prints_what_it_says(tmp_path):
    """The README's example, run as a script: its comments give the shape, the counts and the hit
    rate it prints."""
    block = fenced_block("python-api")
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    shape, counts, hit_rate = result.stdout.split("\n")[:3]
    assert f"# {shape} uint8" in block, f"printed shape {shape}; the comment says otherwise"
    forwards, ticks = counts.split()
    assert f"{forwards} forwards, {ticks} ticks" in block, f"printed {counts}; the comment says otherwise"
    assert 0.15 <= float(hit_rate) <= 0.35, f"hit rate {hit_rate}: the comment says about 0.25"
    assert (tmp_path / "out" / "circle.mp4").stat().st_size > 0


def test_the_dependency_table_lists_what_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {re.split(r"[<>=!~\[; ]", dep)[0] for dep in declared}
    section = README.read_text().split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([^`]+)`", row)}
    assert listed == names, f"only in pyproject: {names - listed}; only in the README: {listed - names}"


def test_the_marker_tables_name_tests_that_exist():
    """A renamed test would silently lose its marker: tests/conftest.py names only tests that exist."""
    tables = runpy.run_path(str(ROOT / "tests" / "conftest.py"))
    for table in ("MULTIRANK", "BROWSER", "SLOW"):
        for module, names in tables[table].items():
            files = list((ROOT / "tests").rglob(f"{module}.py"))
            assert len(files) == 1, f"{table}: test module {module} not found once ({files})"
            if names != tables["ALL"]:
                defined = set(re.findall(r"^(?:async )?def (test_\w+)", files[0].read_text(), re.M))
                missing = {name for name in names if name.split("[")[0] not in defined}
                assert not missing, f"{table}: {module} has no {sorted(missing)}"


def test_every_preset_has_a_row_in_the_readme():
    from launch.presets import PRESETS

    section = README.read_text().split("## Families and presets", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", section, re.M)
    assert rows == list(PRESETS), f"README rows {rows} vs presets {list(PRESETS)}"


def test_the_presets_listing_is_what_the_command_prints(capsys):
    """docs/checkpoints.md shows what `python -m launch.presets --counts` prints today (every preset
    built on the meta device)."""
    from launch.presets import main

    assert main(["--counts"]) == 0
    printed = capsys.readouterr().out.strip()
    assert f"```\n{printed}\n```" in (ROOT / "docs" / "checkpoints.md").read_text(), printed
