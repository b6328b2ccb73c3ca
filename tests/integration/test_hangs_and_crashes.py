"""Ranks that stop answering or die: a frozen rank reported by the other within the limit (and the
run resumed exactly), a stalled data loader and a slow start-up named by phase, a crashed rank
bringing the other down within seconds under every launcher."""

from __future__ import annotations

import contextlib
import re
import time

import psutil
import pytest

from tests.helpers import (
    DIGITS,
    QUICK,
    TRAJECTORY,
    accelerate_config,
    assert_resumed_exactly,
    launch,
    rank_processes,
    start,
)


def test_a_frozen_rank_is_reported_by_the_other_within_the_limit_and_the_run_resumes_exactly(ddp_reference, tmp_path):
    """SIGSTOP freezes rank 1 mid-training, as a stuck filesystem or a wedged host would: rank 0,
    waiting in a collective, writes its stacks and exits 124 after distributed.hang_timeout_minutes."""
    limit_s = 15
    args = [
        *TRAJECTORY,
        "--output-dir",
        str(tmp_path),
        "--checkpoint.every_steps",
        "4",
        "--distributed.hang_timeout_minutes",
        str(limit_s / 60),
    ]
    with start(args, "torchrun") as run:
        run.wait_for_step(tmp_path, 5)
        ranks = rank_processes(run.pid)
        frozen_at = time.time()
        ranks[1].suspend()
        ranks[0].wait(timeout=limit_s + 60)
        reported_after = time.time() - frozen_at
        ranks[1].kill()  # as the scheduler would; torchrun's own SIGTERM waits 30 s on a frozen process
        stderr = run.wait_for_exit(timeout=120)
    assert limit_s <= reported_after < limit_s + 30, reported_after
    assert "exitcode  : 124" in stderr, stderr[-3000:]
    error = re.search(
        r"shardvision: error: rank 0 made no progress for [\d.]+ min in phase '([^']+)' at optimizer step (\d+)", stderr
    )
    assert error and error.group(1) in ("train step", "waiting for the data loader") and int(error.group(2)) >= 5, (
        stderr[-3000:]
    )
    stacks = (tmp_path / "hang-0.txt").read_text()
    assert "Thread" in stacks and "core/trainer.py" in stacks and "in train_one_epoch" in stacks
    published = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert published and published[-1] <= int(error.group(2)), published  # nothing newer than the last complete save

    launch([*args, "--resume", "auto"], launcher="torchrun")
    assert_resumed_exactly(tmp_path, ddp_reference, published[-1])


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_a_crashed_rank_brings_the_other_down_within_seconds(tmp_path, launcher):
    """torchrun's own case is test_background_saves.py's kill during a save; these launchers must do the
    same."""
    args = [
        "--config",
        DIGITS,
        *QUICK,
        "--logging.count_flops",
        "false",
        "--output-dir",
        str(tmp_path),
        "--logging.every_steps",
        "1",
        "--loop.epochs",
        "3",
    ]
    kwargs = {"accelerate": dict(accelerate_config=accelerate_config("multi_gpu_ddp.yaml")), "deepspeed": {}}[launcher]
    if launcher == "deepspeed":
        args += ["--distributed.deepspeed_config", "ds_configs/zero2.json"]
    with start(args, launcher, **kwargs) as run:
        run.wait_for_step(tmp_path, 2)
        survivor = rank_processes(run.pid)[0]
        rank_processes(run.pid)[1].kill()
        killed_at = time.time()
        survivor.wait(timeout=60)
        survivor_gone_after = time.time() - killed_at
        run.wait_for_exit(timeout=60)
    assert run.returncode != 0
    assert survivor_gone_after < 40, survivor_gone_after


def test_a_stalled_data_loader_is_reported_with_its_phase(tmp_path):
    """A loader worker that stops answering (frozen here with SIGSTOP) leaves the main process
    waiting for a batch: the watchdog names that phase."""
    args = [
        "--config",
        DIGITS,
        *QUICK,
        "--logging.count_flops",
        "false",
        "--data.num_workers",
        "1",
        "--output-dir",
        str(tmp_path),
        "--logging.every_steps",
        "1",
        "--distributed.hang_timeout_minutes",
        "0.2",
    ]
    with start(args, "python") as run:
        run.wait_for_step(tmp_path, 1)
        workers = psutil.Process(run.pid).children()
        assert workers, "no loader worker"
        for worker in workers:
            worker.suspend()
        stderr = run.wait_for_exit(timeout=120)
        for worker in workers:  # a frozen worker outlives its process: it cannot see it end
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    assert run.returncode == 124, stderr[-3000:]
    assert re.search(
        r"shardvision: error: rank 0 made no progress for [\d.]+ min in phase 'waiting for the data "
        r"loader' at optimizer step \d+",
        stderr,
    )
    assert "_get_data" in (tmp_path / "hang-0.txt").read_text()  # the DataLoader's wait, in the stacks


def test_startup_has_its_own_limit(tmp_path):
    """A limit of 60 ms, watched every 200 ms, against a start-up that builds resnet18, counts its
    FLOPs and takes a first step of 256 images: over the limit on any machine. (At 0.6 s the
    digits start-up once fitted inside it and the run trained for 100 s.)"""
    args = ["--config", DIGITS, *QUICK, "--output-dir", str(tmp_path), "--distributed.startup_timeout_minutes", "0.001"]
    args += ["--data.micro_batch_size", "256", "--loop.max_steps", "2"]
    proc = launch(args, launcher="python", check=False)
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert (
        "in phase 'startup' at optimizer step 0" in proc.stderr
        and "raise distributed.startup_timeout_minutes" in proc.stderr
    )
    assert (tmp_path / "hang-0.txt").is_file()
