"""Failures as a user meets them, through the real launchers on 2 gloo ranks: bad data in error
and skip mode, the check-data pre-flight, and a stress run proving that every run that finished
its work exits 0 (test_hangs_and_crashes.py covers hangs and crashes, test_stop_signals.py
preemption)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.builders import coco, imagefolder, voc
from tests.helpers import DIGITS, QUICK, REPO, TINY_VIT, launch, launch_command, read_metrics, run_env

SHARDVISION = str(Path(sys.executable).parent / "shardvision")
WATCHED = [
    "--distributed.hang_timeout_minutes",
    "1",
    "--logging.count_flops",
    "false",
]  # a rank out of step would hang: fail fast


def errors_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("shardvision: error:")]


def test_two_ranks_stop_together_on_a_bad_sample_and_say_it_once(tmp_path):
    _, args, bad = imagefolder(tmp_path / "data")
    proc = launch([*args, *QUICK, *WATCHED, "--output-dir", str(tmp_path / "run")], check=False)
    errors = errors_in(proc.stderr)
    assert len(errors) == 1 and any(re.search(p, errors[0]) for p in bad["train"]), proc.stderr[-3000:]
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
    assert 2 in codes and set(codes) <= {2, -15}, codes  # a rank torchrun stopped after the other left shows SIGTERM
    assert "core/trainer.py" not in proc.stderr  # no rank's traceback
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_annotation_found_at_start_is_one_line_from_one_rank(tmp_path):
    _, args, bad = coco(tmp_path / "data")
    proc = launch(
        [*args, *QUICK, *WATCHED, "--output-dir", str(tmp_path / "run")],
        script="recipes/detection/train.py",
        check=False,
    )
    errors = errors_in(proc.stderr)
    assert len(errors) == 1 and re.search(bad["train"][0], errors[0]), proc.stderr[-3000:]
    assert 2 in [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]


@pytest.mark.parametrize("source", ["imagefolder", "voc"])
def test_two_ranks_skip_bad_samples_and_stay_in_step(tmp_path, source):
    recipe, args, bad = {"imagefolder": imagefolder, "voc": voc}[source](tmp_path / "data")
    run = tmp_path / "run"
    launch(
        [
            *args,
            *QUICK,
            *WATCHED,
            "--data.bad_samples",
            "skip",
            "--loop.epochs",
            "2",
            "--logging.every_steps",
            "1",
            "--data.micro_batch_size",
            "2",
            "--output-dir",
            str(run),
        ],
        script=f"recipes/{recipe}/train.py",
    )
    listed = (run / "bad_samples.txt").read_text().splitlines()
    assert len(listed) == len(bad["train"] + bad["eval"])  # met by either rank, listed once
    for pattern in bad["train"] + bad["eval"]:
        assert sum(bool(re.search(pattern, line)) for line in listed) == 1, (pattern, listed)
    train_samples = {"imagefolder": 16, "voc": 8}[source]
    steps_per_epoch = train_samples // (2 * 2)  # 2 ranks x micro-batch 2: substitution keeps every batch whole
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == list(range(1, 2 * steps_per_epoch + 1))
    assert train[-1]["bad_samples"] == len(listed)


def test_check_data_lists_every_problem_in_one_report(tmp_path):
    _, args, bad = imagefolder(tmp_path / "data")
    proc = subprocess.run(
        [SHARDVISION, "check-data", "classification", *args, "--data.num_workers", "2"],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # a user error, as docs/failures.md says
    lines = proc.stdout.splitlines()
    for pattern in bad["train"] + bad["eval"]:
        assert sum(bool(re.search(pattern, line)) for line in lines) == 1, (pattern, lines)
    assert "train: 16 samples read, 2 problems" in lines and "eval: 8 samples read, 1 problems" in lines
    clean = subprocess.run(
        [SHARDVISION, "check-data", "classification", "--config", DIGITS],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert clean.returncode == 0 and "train: 1437 samples read, 0 problems" in clean.stdout, clean.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Every run that finished its work exits 0. Before the fix about one 2-rank run in 12 aborted at
# interpreter exit (see core/entry.py `leave`); here STRESS_RUNS short runs go two at a time, so each has the
# other's two ranks competing for the 2 cores, under every strategy, training and eval-only.
# ---------------------------------------------------------------------------------------------

STRATEGIES = {
    "ddp": dict(launcher="torchrun"),
    "zero2": dict(launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs" / "deepspeed_zero2.yaml")),
    "zero3": dict(launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml")),
}
# One of each kind. The abort it guards against came 2 in 23 runs before the fix: these 6 runs
# would have caught it about 2 times in 5; the suite's other 190 or so launches each assert exit 0
# too, and under `make test`'s two pytest workers each of them shares the machine with the other
# worker's runs. (12 runs, 2 of each kind, cost 170 s of a worker there.) The tiny ViT: the abort is
# at interpreter exit, after the work, whatever the model.
STRESS_RUNS = 6


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("weights")
    args = [*TINY_VIT, "--loop.max_steps", "1", "--logging.count_flops", "false", "--output-dir", str(run)]
    launch(args, launcher="python")
    return run / "final" / "model.safetensors"


def test_every_finished_run_exits_0_on_a_busy_machine(tmp_path, digits_weights):
    kinds = [(strategy, mode) for strategy in STRATEGIES for mode in ("train", "eval-only")]

    def one(i: int) -> tuple[str, int, str]:
        strategy, mode = kinds[i % len(kinds)]
        run = tmp_path / f"{i}-{strategy}-{mode}"
        args = [*TINY_VIT, "--output-dir", str(run), "--logging.count_flops", "false"]
        args += ["--loop.max_steps", "2"] if mode == "train" else ["--eval-only", "--weights", str(digits_weights)]
        proc = subprocess.run(
            launch_command(args, **STRATEGIES[strategy]),
            cwd=REPO,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        finished = (run / "final" / "metrics.json").is_file() if mode == "train" else bool(read_metrics(run, "eval"))
        assert finished, proc.stderr[-3000:]  # the run did its work; only the exit is in question
        return f"{strategy}/{mode}", proc.returncode, proc.stderr

    started = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, range(STRESS_RUNS)))
    failed = [(kind, code, stderr[-1500:]) for kind, code, stderr in results if code != 0]
    assert not failed, f"{len(failed)} of {STRESS_RUNS} finished runs exited non-zero:\n" + "\n".join(map(str, failed))
    print(f"{STRESS_RUNS} runs, 0 failed exits, {time.time() - started:.0f} s")
