"""Drift guard for the docs: every repository file they name exists.

Read: README.md, docs/*.md, the recipes' train.py docstrings, the comments and values of the
shipped configs (recipes/*/configs/*.yaml, accelerate_configs/*.yaml) and launchers/slurm.sbatch.
Checked: paths under the repository's own top-level folders (`core/ema.py`, `tests/integration/`,
`recipes/*/configs/*.yaml` as a glob, `<task>` as a wildcard), the root files a doc may name
(README.md, setup.py, ...), relative Markdown links, and bare test file names (`test_slurm.py`).
Not checked: what a run writes (`runs/...`, `final/model.safetensors`, `checkpoints/<step>/`),
absolute paths (`/data/imagenet`) and paths elided with `...`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

# The repository's top-level folders: a path that starts with one of them names a repo file.
ROOTS = ("core", "recipes", "tests", "accelerate_configs", "ds_configs", "benchmarks", "launchers", "docs", ".ci")
ROOT_FILES = (
    "setup.py",
    "setup.cfg",
    "pyproject.toml",
    "requirements.lock",
    "requirements.txt",
    "Makefile",
    "pytest.ini",
    "tox.ini",
    ".pre-commit-config.yaml",
)
# Not preceded by a path character (so `runs/x/core/...` and `/abs/tests/...` are not read as
# repo paths); the path runs up to the first character a path here never has.
REPO_PATH = re.compile(rf"(?<![\w./<>-])((?:{'|'.join(re.escape(r) for r in ROOTS)})/[\w./*<>{{}},-]*)")
ROOT_FILE = re.compile(rf"(?<![\w./<>-])({'|'.join(re.escape(f) for f in ROOT_FILES)}|[A-Z][A-Z_]+\.md)(?![\w/-])")
TEST_FILE = re.compile(r"(?<![\w./<>-])(test_\w+\.py)\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def documents() -> list[Path]:
    return sorted(
        [
            REPO / "README.md",
            *(REPO / "docs").glob("*.md"),
            *(REPO / "recipes").glob("*/train.py"),
            *(REPO / "recipes").glob("*/configs/*.yaml"),
            *(REPO / "accelerate_configs").glob("*.yaml"),
            REPO / "launchers" / "slurm.sbatch",
        ]
    )


def text_of(doc: Path) -> str:
    """What a reader reads: a train.py's docstring, any other file whole."""
    if doc.suffix == ".py":
        return ast.get_docstring(ast.parse(doc.read_text())) or ""
    return doc.read_text()


def exists(path: str) -> bool:
    """`path` (relative to the repo root) names at least one file or folder; `<...>` placeholders
    and `{a,b}` alternatives become wildcards."""
    if "..." in path:  # elided: `recipes/...`
        return True
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", path.rstrip("/"))
    if any(c in pattern for c in "*?["):
        return any(REPO.glob(pattern))
    return (REPO / pattern).exists()


def named_paths(text: str) -> set[str]:
    # A sentence's full stop or comma is not part of the path; an ellipsis is (`recipes/...`).
    found = {m if m.endswith("...") else m.rstrip(".,:;") for m in REPO_PATH.findall(text)}
    return found | set(ROOT_FILE.findall(text))


def missing_in(doc: Path) -> list[str]:
    text = text_of(doc)
    missing = sorted(p for p in named_paths(text) if not exists(p))
    test_files = {p.name for p in (REPO / "tests").rglob("test_*.py")}
    missing += sorted(f"{name} (a test file)" for name in set(TEST_FILE.findall(text)) - test_files)
    if doc.suffix == ".md":
        for target in MARKDOWN_LINK.findall(text):
            if "://" not in target and not target.startswith("mailto:") and not (doc.parent / target).exists():
                missing.append(f"{target} (a link)")
    return missing


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_a_doc_names_exists(doc):
    assert not missing_in(doc), f"{doc.relative_to(REPO)} names what the repo does not have: {missing_in(doc)}"


def test_the_pattern_reads_repo_paths_and_leaves_run_outputs_alone():
    text = (
        "see `core/ema.py`, tests/integration/test_slurm.py. `recipes/*/configs/*.yaml`, "
        "`checkpoints/<step>/`, `runs/digits/final/model.safetensors`, `<output_dir>/eval/step-<N>/`, "
        "/data/imagenet/train, `recipes/...`, [clusters](docs/clusters.md), setup.py and DEVELOPERS.md"
    )
    assert named_paths(text) == {
        "core/ema.py",
        "tests/integration/test_slurm.py",
        "recipes/*/configs/*.yaml",
        "recipes/...",
        "docs/clusters.md",
        "setup.py",
        "DEVELOPERS.md",
    }
    assert not exists("DEVELOPERS.md") and not exists("core/no_such_module.py")
    assert exists("recipes/<task>/train.py") and exists("recipes/...")
