"""Stop signals as schedulers send them (SIGTERM, SIGUSR1) to every rank: the run checkpoints
where it is, mid-epoch or mid-evaluation, exits 75, and the resumed launch ends exactly as the
uninterrupted run (2 gloo ranks through torchrun, and one process)."""

from __future__ import annotations

import json
import re
import signal

from tests.helpers import (
    DIGITS,
    QUICK,
    TRAJECTORY,
    assert_resumed_exactly,
    final_weights_equal,
    last_launch,
    launch,
    rank_processes,
    read_metrics,
    start,
    train_losses,
)


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_exactly(ddp_reference, tmp_path):
    """SLURM and cloud schedulers send SIGTERM (or SIGUSR1) to every rank before killing them."""
    args = [*TRAJECTORY, "--output-dir", str(tmp_path)]
    with start(args, "torchrun") as run:
        run.wait_for_step(tmp_path, 4)
        for worker in rank_processes(run.pid).values():
            worker.send_signal(signal.SIGTERM)
        stderr = run.wait_for_exit()
    assert "exitcode  : 75" in stderr, stderr[-3000:]
    # What the user reads (the step saved is in the checkpoint rows).
    assert "stopped by SIGTERM" in stderr and "rerun with --resume auto" in stderr, stderr[-3000:]
    saved = [row["step"] for row in read_metrics(tmp_path, "checkpoint")]
    assert len(saved) == 1 and 4 <= saved[0] < 11, saved  # mid-epoch 0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [str(saved[0])]
    launch([*args, "--resume", "auto"], launcher="torchrun")
    assert_resumed_exactly(tmp_path, ddp_reference, saved[0])
    assert train_losses(tmp_path) == train_losses(ddp_reference)  # each step once: the stop saved the step it ended


def test_sigterm_during_an_evaluation_exits_75_at_the_next_batch_and_resumes_exactly(ddp_reference, tmp_path):
    """The epoch's checkpoint is written before its evaluation; a stop during the evaluation ends it
    at the next batch. The resumed run evaluates again, then trains on exactly as if never stopped
    (evaluation leaves the training's random streams alone)."""
    args = [*TRAJECTORY, "--output-dir", str(tmp_path), "--checkpoint.at_epoch_end", "true"]
    args += ["--checkpoint.async_save", "false", "--data.eval_micro_batch_size", "1"]  # 180 batches per rank
    with start(args, "torchrun") as run:
        run.wait_for_file(tmp_path / "checkpoints" / "11" / "manifest.json")  # published before the evaluation
        for worker in rank_processes(run.pid).values():
            worker.send_signal(signal.SIGTERM)
        stderr = run.wait_for_exit()
    assert "exitcode  : 75" in stderr, stderr[-3000:]
    stopped = re.search(r"evaluation at step 11, after (\d+) of its 180 batches", stderr)  # only said there
    assert stopped and int(stopped.group(1)) < 180, stderr[-3000:]
    assert {row["step"] for row in read_metrics(tmp_path, "checkpoint")} == {11}
    assert not (tmp_path / "eval" / "step-11").exists()  # the evaluation did not finish
    state = json.loads((tmp_path / "checkpoints" / "11" / "trainer_state.json").read_text())
    assert (state["epoch"], state["evaluation_due"]) == (1, True)
    assert not (tmp_path / "checkpoints" / "11" / "evaluation.json").exists()

    launch([*args, "--resume", "auto"], launcher="torchrun")
    assert last_launch(tmp_path)["resumed_from"] == str(tmp_path / "checkpoints" / "11")
    assert (tmp_path / "checkpoints" / "11" / "evaluation.json").is_file()
    evaluated = {row["step"]: row["top1"] for row in read_metrics(tmp_path, "eval")}
    assert evaluated == {row["step"]: row["top1"] for row in read_metrics(ddp_reference, "eval")}
    assert sorted(evaluated) == [11, 22]
    expected = train_losses(ddp_reference)
    assert all(losses == expected[step] for step, losses in train_losses(tmp_path).items())
    assert final_weights_equal(ddp_reference, tmp_path)


def test_single_process_sigterm_exit_code(tmp_path):
    args = ["--config", DIGITS, *QUICK, "--logging.count_flops", "false", "--output-dir", str(tmp_path)]
    args += ["--logging.every_steps", "1"]
    with start(args, "python") as run:
        run.wait_for_step(tmp_path, 2)
        run.proc.send_signal(signal.SIGUSR1)
        stderr = run.wait_for_exit()
    assert run.returncode == 75, stderr[-3000:]
    assert "stopped by SIGUSR1" in stderr
