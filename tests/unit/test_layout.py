"""Drift guards for the layout rules a newcomer relies on (docs/architecture.md). The import rules
(recipes/ never touches torch.distributed or deepspeed, core/ never imports recipes/) are ruff
rules: recipes/ruff.toml and core/ruff.toml, run by `make lint`."""

from __future__ import annotations

import re

import pytest

from core.commands.cli import main
from tests.helpers import REPO


def sources(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


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
    assert exit_info.value.code == 2 and "invalid choice: 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "classification", "--help"])
    assert exit_info.value.code == 0 and "--tasks-per-node" in capsys.readouterr().out
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


@pytest.mark.parametrize(
    "path, source, banned",
    [
        ("recipes/classification/x.py", "import torch.distributed as dist\n", "torch.distributed"),
        ("recipes/detection/x.py", "import deepspeed\n", "deepspeed"),
        ("core/x.py", "from recipes.classification import task\n", "recipes"),
        ("tests/x.py", "import torch\ntorch.load('w.pt')\n", "torch.load"),
    ],
)
def test_lint_bans_what_the_layout_forbids(path, source, banned):
    import subprocess
    import sys

    ruff = [sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "--output-format", "concise", "-"]
    proc = subprocess.run(ruff, cwd=REPO, input=source, capture_output=True, text=True)
    assert proc.returncode == 1 and f"TID251 `{banned}` is banned" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "env, same_node",
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, True),  # one node, no local size given: all on rank 0's
        ({"RANK": "7", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, True),  # torchrun, accelerate
        ({"RANK": "8", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, False),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "1"}, False),  # the deepspeed launcher, 1 rank per host
    ],
)
def test_a_rank_knows_whether_rank_0s_launcher_will_stop_it(monkeypatch, env, same_node):
    """A rank on another node waits only briefly for rank 0 to report a shared failure: no launcher
    of its own node will stop it when rank 0 leaves (core/entry.py leave)."""
    from core.entry import _on_rank_0s_node

    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _on_rank_0s_node() is same_node
