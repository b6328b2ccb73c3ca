"""`shardvision submit --cluster slurm` as far as a machine without SLURM can take it: the real
submitit SlurmExecutor writes its submission script and calls `sbatch`, here a stand-in that keeps
the script and answers as sbatch does. The local cluster's preemption and requeue run for real in
tests/integration/test_submit.py."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import cloudpickle
import pytest

from core.commands.submit import SubmittedRun, submit_main, with_resume_auto
from tests.helpers import DIGITS, REPO


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` first on PATH that copies the script it is given and prints a job id (and an
    `srun`, which submitit looks for)."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {kept}\necho "Submitted batch job 4242"\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    srun = bin_dir / "srun"  # submitit checks that it is on a SLURM host
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return kept


def test_slurm_submission_asks_for_the_nodes_tasks_gpus_time_and_signal(fake_sbatch, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    submit_main(
        ["classification", "--nodes", "2", "--tasks-per-node", "8", "--timeout-min", "90", "--partition", "gpu"]
        + ["--slurm", "constraint=volta32gb", "--slurm", "cpus_per_task=10"]
        + ["--config", DIGITS, "--output-dir", str(run_dir), "--optim.lr", "3e-4"]
    )
    script = fake_sbatch.read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",  # one task per rank
        "#SBATCH --gpus-per-node=8",  # one GPU per rank
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@180",  # the preemption/timeout signal, 3 minutes before the limit
        "#SBATCH --partition=gpu",
        "#SBATCH --constraint=volta32gb",
        "#SBATCH --cpus-per-task=10",
    ):
        assert line in script.splitlines(), (line, script)
    assert re.search(r"srun .* -m submitit\.core\._submit", script), script

    out = capsys.readouterr().out
    assert "submitted job 4242 (slurm): 2 node(s) x 8 task(s) = 16 ranks" in out
    job_dir = run_dir / "submitit"
    assert f"in {job_dir}" in out and f"run folder: {run_dir}" in out
    submitted = cloudpickle.loads((job_dir / "4242_submitted.pkl").read_bytes())
    run = submitted.function
    assert isinstance(run, SubmittedRun) and run.task == "classification"
    assert run.argv[run.argv.index("--config") + 1] == str(REPO / DIGITS)  # absolute: the job may start elsewhere
    assert run.argv[-2:] == ["--output-dir", str(run_dir)]
    assert "--resume" not in run.argv  # the first job starts as asked; only requeued ones resume
    requeued = run.checkpoint().function
    assert requeued.argv[-2:] == ["--resume", "auto"] and requeued.task == "classification"


def test_a_bad_training_flag_or_slurm_option_fails_at_submission(fake_sbatch, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    common = ["classification", "--config", DIGITS, "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        submit_main([*common, "--optim.lrr", "1"])
    assert stop.value.code == 2 and "optim.lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        submit_main([*common, "--slurm", "constraint"])
    assert stop.value.code == 2 and "--slurm constraint: expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        submit_main([*common, "--cluster", "local", "--nodes", "2"])
    assert stop.value.code == 2 and "--cluster local runs on this machine only" in capsys.readouterr().err
    assert not fake_sbatch.exists()  # nothing was submitted


def test_a_requeued_run_resumes_auto_whatever_it_was_started_with():
    assert with_resume_auto(["--config", "c.yaml", "--resume", "/other/run/checkpoints/7", "--optim.lr", "1"]) == [
        "--config",
        "c.yaml",
        "--optim.lr",
        "1",
        "--resume",
        "auto",
    ]
    assert with_resume_auto(["--resume=auto"]) == ["--resume", "auto"]
