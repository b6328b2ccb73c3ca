"""The `shardvision` command line (core/commands/cli.py): every command explains itself with --help (exit 0),
a mistake in the command or task exits 2, and train/eval/check-data reach the recipe with the
rest of the line. In-process through `main`, as the console script calls it; one real process
for `python -m core.commands.cli`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from core.commands.cli import COMMANDS, RECIPE_COMMANDS, main
from core.config_parsing import parse_args
from core.entry import TASKS
from recipes.classification.task import ClassificationConfig
from tests.builders import imagefolder
from tests.helpers import DIGITS, QUICK, REPO, run_env


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width: one option per line


def exit_code_and_output(capsys, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def option_lines(help_text: str) -> list[str]:
    """The options a help text defines: each line that starts (indented) with a flag."""
    return re.findall(r"^ +(--[\w.-]+)", help_text, re.M)


def test_python_dash_m_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "core.commands.cli", "--help"], cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: shardvision ")
    for command in COMMANDS:
        assert re.search(rf"^ +{command}\b", proc.stdout, re.M), command


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_own_help(command, capsys):
    code, out, _ = exit_code_and_output(capsys, [command, "--help"])
    assert code == 0
    assert out.startswith(f"usage: shardvision {command} ")
    assert "training entry point" not in out
    example = re.search(rf"^ +shardvision {command} \S.*", out, re.M)
    assert example, out
    for path in re.findall(r"recipes/\S+\.yaml", out):  # the example names a config that exists
        assert (REPO / path).is_file(), path


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_a_task_help_lists_its_config_keys_in_one_spelling_each(command, task, capsys):
    code, out, _ = exit_code_and_output(capsys, [command, task, "--help"])
    assert code == 0
    assert out.startswith(f"usage: shardvision {command} {task} ")
    example = re.search(rf"^ +shardvision {command} {task} --config (\S+)", out, re.M)
    assert example and (REPO / example[1]).is_file(), out
    flags = option_lines(out)
    assert {"--config", "--output-dir", "--eval-only", "--optim.lr", "--distributed.strategy"} <= set(flags)
    spellings = [flag.replace("-", "_") for flag in flags]
    assert len(spellings) == len(set(spellings)), sorted(f for f in flags if spellings.count(f.replace("-", "_")) > 1)
    assert "--optim.lr (float, default 0.001)" in out


def test_unknown_command_or_task_exits_2(capsys):
    for argv in (["fly"], ["train", "fly"], ["check-data", "fly", "--config", DIGITS], ["plan", "fly"], []):
        code, _, err = exit_code_and_output(capsys, argv)
        assert code == 2, argv
        assert "invalid choice: 'fly'" in err or "required: COMMAND" in err, (argv, err)


def test_both_spellings_are_accepted(tmp_path):
    """Help shows one spelling; scripts keep working with either."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # only its existence is checked here
    for output_dir, eval_only in (("--output-dir", "--eval-only"), ("--output_dir", "--eval_only")):
        argv = ["--config", str(REPO / DIGITS), output_dir, str(tmp_path), eval_only, "--weights", str(weights)]
        cfg = parse_args(ClassificationConfig, argv)
        assert cfg.output_dir == str(tmp_path) and cfg.eval_only and cfg.model.weights == str(weights)


def test_train_and_eval_reach_the_trainer_with_the_rest_of_the_line(tmp_path, monkeypatch):
    import core.trainer

    seen = []

    class Recorder:
        def __init__(self, cfg, task):
            seen.append(cfg)

        def fit(self):
            return {}

    monkeypatch.setattr(core.trainer, "Trainer", Recorder)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    common = ["--config", str(REPO / DIGITS), "--output-dir", str(tmp_path)]
    main(["train", "classification", *common, "--optim.lr", "3e-4"])
    main(["eval", "classification", *common, "--weights", str(weights)])
    train, evaluate = seen
    assert train.optim.lr == 3e-4 and not train.eval_only and train.output_dir == str(tmp_path)
    assert evaluate.eval_only and evaluate.model.weights == str(weights)


def test_check_data_exits_2_on_bad_data_and_0_on_clean_data(tmp_path, capsys):
    _, args, bad = imagefolder(tmp_path / "data")
    code, out, err = exit_code_and_output(capsys, ["check-data", "classification", *args, *QUICK])
    assert code == 2
    for pattern in bad["train"] + bad["eval"]:
        assert re.search(pattern, out), pattern
    errors = [line for line in err.splitlines() if line.startswith("shardvision: error:")]
    assert len(errors) == 1 and "3 problems in the data" in errors[0], err
    code, out, _ = exit_code_and_output(
        capsys, ["check-data", "classification", "--config", str(REPO / DIGITS), *QUICK]
    )
    assert code == 0 and "train: 1437 samples read, 0 problems" in out
