"""Drift guards for the layout rules a newcomer relies on (docs/ and ../shared/ARCHITECTURE)."""

from __future__ import annotations

import re

import pytest

from core.cli import main
from tests.conftest import REPO


def sources(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def test_recipes_never_touch_distribution_directly():
    for path in sources("recipes"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch\.distributed|deepspeed)", text, re.M), path


def test_core_never_imports_recipes():
    for path in sources("core"):
        assert not re.search(r"^\s*(import|from)\s+recipes", path.read_text(), re.M), path


def test_recipe_entry_points_stay_thin():
    for path in (REPO / "recipes").glob("*/train.py"):
        assert len(path.read_text().splitlines()) <= 100, path


def test_no_unsafe_torch_load():
    for path in sources("core") + sources("recipes"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_console_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly", "classification"])
    assert exit_info.value.code == 2 and "usage: shardvision {train,eval,check-data}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "classification", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--optim.lr (float, default 0.001)" in out and "--distributed.strategy" in out


def test_slurm_template_parses_and_matches_the_exit_code():
    import subprocess

    from core.exit_codes import ExitCode

    path = REPO / "launchers" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert f"PREEMPTED_EXIT_CODE={ExitCode.PREEMPTED.value}" in path.read_text()


def test_every_exit_code_is_in_the_failures_table():
    from core.exit_codes import ExitCode

    doc = (REPO / "docs" / "failures.md").read_text()
    for code in ExitCode:
        assert re.search(rf"^\| `{code.value}` \| {code.name.lower().replace('_', ' ')} \|", doc, re.M), code
