"""Real multi-process runs of the classification recipe on CPU (2 gloo ranks), through the same
launchers a user types: torchrun, accelerate launch with the repo's configs, the deepspeed
launcher, and plain python."""

from __future__ import annotations

import json
import math
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    DIGITS,
    QUICK,
    REPO,
    TINY_VIT,
    TRAJECTORY,
    accelerate_config,
    final_weights_equal,
    last_launch,
    launch,
    launch_command,
    rank_processes,
    read_metrics,
    run_env,
    run_killed_when,
    start,
    train_losses,
)


def test_lr_per_optimizer_step_ignores_ranks_and_accumulation(ddp_reference, tmp_path):
    """1 process x 32 x 4 accumulation against the reference's 2 ranks x 64: the same global
    batch of 128, hence the same optimizer steps and the same lr at each of them."""
    launch(
        [*TRAJECTORY, "--output-dir", str(tmp_path), "--data.micro_batch_size", "32", "--loop.grad_accum_steps", "4"],
        launcher="python",
    )
    lr = {row["step"]: row["lr"] for row in read_metrics(tmp_path, "train")}
    reference = {row["step"]: row["lr"] for row in read_metrics(ddp_reference, "train")}
    assert lr == reference and len(lr) == 22
    # digits.yaml: peak 2e-3, warmup 1 epoch = 11 steps from 0.01x, then cosine to 0 over 11 steps.
    # The logged lr is the one the next step will use, i.e. the schedule at `step`.
    for step, value in lr.items():
        if step < 11:
            expected = 2e-3 * (0.01 + 0.99 * step / 11)
        else:
            expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step - 11) / 11))
        assert value == pytest.approx(expected, abs=1e-12), step


def eval_row(run_dir: Path) -> dict:
    return read_metrics(run_dir, "eval")[-1]


def test_two_rank_evaluation_equals_one_process(ddp_reference, tmp_path):
    """Eval batch 7 leaves 360 samples unevenly split over 2 ranks: accelerate pads the last
    batch, and each sample must still count exactly once."""
    weights = str(ddp_reference / "final" / "model.safetensors")
    common = ["--config", DIGITS, *QUICK, "--eval-only", "--weights", weights, "--data.eval_micro_batch_size", "7"]
    launch(
        [*common, "--output-dir", str(tmp_path / "two")],
        launcher="accelerate",
        accelerate_config=accelerate_config("multi_gpu_ddp.yaml"),
    )
    launch([*common, "--output-dir", str(tmp_path / "one")], launcher="python")
    two, one = last_launch(tmp_path / "two"), last_launch(tmp_path / "one")
    assert (two["world_size"], two["strategy"], one["world_size"]) == (2, "ddp", 1)
    m2, m1 = eval_row(tmp_path / "two"), eval_row(tmp_path / "one")
    assert m1["samples"] == m2["samples"] == 360
    assert m1["top1"] == m2["top1"] and m1["top5"] == m2["top5"]
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)
    trained = json.load(open(ddp_reference / "final" / "metrics.json"))  # same weights, batch 64
    assert trained["top1"] == m1["top1"]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_accumulation_equals_one_larger_batch(tmp_path, strategy):
    """4 micro-batches of 8 per rank give the same update as one batch of 32 per rank.
    A LayerNorm ViT, so no statistic depends on the micro-batch size; SGD, whose update is linear
    in the gradient (Adam's first step is lr * sign(g), which turns rounding noise in near-zero
    gradients into full-size differences)."""
    common = [
        *TINY_VIT,
        "--optim.name",
        "sgd",
        "--optim.lr",
        "0.1",
        "--loop.max_steps",
        "1",
        "--schedule.name",
        "constant",
        "--schedule.warmup_steps",
        "0",
    ]
    kwargs = (
        dict(launcher="torchrun")
        if strategy == "ddp"
        else dict(launcher="accelerate", accelerate_config=accelerate_config("deepspeed_zero2.yaml"))
    )
    for name, micro, accum in (("accumulated", 8, 4), ("large", 32, 1)):
        launch(
            [
                *common,
                "--output-dir",
                str(tmp_path / name),
                "--data.micro_batch_size",
                str(micro),
                "--loop.grad_accum_steps",
                str(accum),
            ],
            **kwargs,
        )
    a = load_file(tmp_path / "accumulated" / "final" / "model.safetensors")
    b = load_file(tmp_path / "large" / "final" / "model.safetensors")

    import timm

    from core.distributed import seed_everything

    seed_everything(0)  # the trainer's initial weights
    init = timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()
    for k in a:
        update_a, update_b = a[k] - init[k], b[k] - init[k]
        assert update_a.norm() > 0, f"{k}: no optimizer step happened"
        assert (update_a - update_b).norm() <= 1e-4 * update_a.norm(), k


def test_demo_reaches_95_percent(tmp_path):
    """The README's demo: digits, 2 ranks, default config."""
    launch(["--config", DIGITS, "--output-dir", str(tmp_path), "--logging.progress_bar", "false"], launcher="torchrun")
    metrics = json.load(open(tmp_path / "final" / "metrics.json"))
    assert metrics["top1"] >= 95.0, metrics
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    rows = read_metrics(tmp_path, "eval")
    assert {"step", "epoch", "split", "loss", "top1", "top5"} <= set(rows[-1])


def test_deepspeed_launcher_and_python_module_in_bf16(tmp_path):
    """The suite's bf16 run under ZeRO-2 and its single-process one (CPU autocast): the tiny ViT,
    since bf16 matmuls on CPU are slow and what is proven is the launch and the precision, not
    learning. No FLOP count: one more bf16 forward at start-up."""
    common = [*TINY_VIT, "--loop.max_steps", "2", "--loop.precision", "bf16", "--logging.count_flops", "false"]
    launch(
        [*common, "--output-dir", str(tmp_path / "ds"), "--distributed.deepspeed_config", "ds_configs/zero2.json"],
        launcher="deepspeed",
    )
    ds = last_launch(tmp_path / "ds")
    assert (ds["world_size"], ds["strategy"], ds["zero_stage"], ds["precision"]) == (2, "deepspeed", 2, "bf16")
    launch([*common, "--output-dir", str(tmp_path / "py")], launcher="module")  # CPU autocast
    single = last_launch(tmp_path / "py")
    assert (single["world_size"], single["strategy"], single["precision"]) == (1, "single", "bf16")
    assert (tmp_path / "py" / "final" / "model.safetensors").is_file()


def test_bad_config_exits_2_with_the_message(tmp_path):
    proc = launch(["--config", DIGITS, "--optim.lrr", "0.1"], launcher="python", check=False)
    assert proc.returncode == 2
    assert "shardvision: error: --optim.lrr: unknown key 'optim.lrr'. Did you mean 'optim.lr'?" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Crashes, preemption, another cluster size, export
# ---------------------------------------------------------------------------------------------


def rows_of_the_last_launch(run_dir: Path, split: str) -> list[dict]:
    """The `split` rows metrics.jsonl holds from its last `run` row on: the latest launch's."""
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    start = max(i for i, row in enumerate(rows) if row["split"] == "run")
    return [row for row in rows[start:] if row["split"] == split]


def assert_resumed_exactly(run_dir: Path, reference: Path, checkpoint: int) -> None:
    """The last launch resumed from `checkpoint` (a launch that started afresh by mistake would also
    end on the reference: the same seed) and trained each later step once, with the reference's
    loss; every row the launches before logged is the reference's too; the final weights are the
    reference's, bit for bit."""
    assert last_launch(run_dir)["resumed_from"] == str(run_dir / "checkpoints" / str(checkpoint))
    expected = train_losses(reference)
    resumed = [(row["step"], row["loss"]) for row in rows_of_the_last_launch(run_dir, "train")]
    assert resumed == [(step, expected[step][0]) for step in range(checkpoint + 1, max(expected) + 1)], resumed
    got = train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    assert all(loss == expected[step][0] for step, losses in got.items() for loss in losses), got
    assert final_weights_equal(reference, run_dir)


def test_sigkill_while_a_background_save_is_writing_resumes_from_the_previous_checkpoint(ddp_reference, tmp_path):
    """Rank 0 writes the model and optimizer and publishes; it is killed once its background write
    of step 14 has begun (the capture is over and training has moved on). The run resumes from
    step 7 and ends as if nothing had happened."""
    args = [*TRAJECTORY, "--output-dir", str(tmp_path), "--checkpoint.every_steps", "7"]
    writing = tmp_path / "checkpoints" / ".tmp-14" / "model.safetensors"  # only the background thread writes it
    run_killed_when(args, writing, rank=0, launcher="torchrun")
    assert not (tmp_path / "checkpoints" / "14").exists()  # the kill came before the publish
    launch([*args, "--resume", "auto"], launcher="torchrun")
    assert not (tmp_path / "checkpoints" / ".tmp-14").exists()  # cleaned up by the next save
    assert_resumed_exactly(tmp_path, ddp_reference, 7)


def test_background_and_synchronous_zero3_saves_write_the_same_checkpoint(tmp_path):
    """DeepSpeed's shards (written through its checkpoint engine) and the EMA's, held and written
    later, byte for byte as a synchronous save writes them."""
    kwargs = dict(launcher="accelerate", accelerate_config=accelerate_config("deepspeed_zero3.yaml"))
    args = [*TINY_VIT, "--loop.max_steps", "2", "--loop.ema_decay", "0.9"]
    for background in ("true", "false"):
        launch([*args, "--output-dir", str(tmp_path / background), "--checkpoint.async_save", background], **kwargs)
    manifests = [(tmp_path / b / "checkpoints" / "2" / "manifest.json").read_text() for b in ("true", "false")]
    assert manifests[0] == manifests[1]
    assert "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifests[0]
    assert "ema-rank00001-of-00002.safetensors" in manifests[0]


def test_a_background_save_that_cannot_be_written_stops_the_run_naming_it(tmp_path):
    """A filesystem that refuses the write (here the kernel's file-size limit, as a quota or a
    full disk would): the run stops at a later step with the path and the reason."""
    limit = 4 << 20  # above every small file a run writes, below the model's 45 MB

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["--config", DIGITS, *QUICK, "--output-dir", str(tmp_path), "--checkpoint.every_steps", "2"]
    cmd = launch_command([*args, "--loop.max_steps", "8", "--logging.every_steps", "1"], "torchrun")
    proc = subprocess.run(
        cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600, preexec_fn=file_size_limit
    )
    assert proc.returncode != 0
    folder = tmp_path / "checkpoints" / "2"
    assert re.search(
        rf"rank 0: the background save of {re.escape(str(folder))} failed \(.*File too large",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert not folder.exists()
    assert max(row["step"] for row in read_metrics(tmp_path, "train")) < 8


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
    """torchrun's own case is the kill during a save above; these launchers must do the same."""
    args = [
        "--config",
        DIGITS,
        *QUICK,
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


def test_single_process_sigterm_exit_code(tmp_path):
    args = ["--config", DIGITS, *QUICK, "--output-dir", str(tmp_path), "--logging.every_steps", "1"]
    with start(args, "python") as run:
        run.wait_for_step(tmp_path, 2)
        run.proc.send_signal(signal.SIGUSR1)
        stderr = run.wait_for_exit()
    assert run.returncode == 75, stderr[-3000:]
    assert "stopped by SIGUSR1" in stderr


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_export_equals_deepspeeds_own_consolidation(tmp_path, stage):
    zero = dict(launcher="accelerate", accelerate_config=accelerate_config(f"deepspeed_zero{stage}.yaml"))
    run = tmp_path / "run"
    launch(["--config", DIGITS, *QUICK, "--loop.max_steps", "3", "--output-dir", str(run)], **zero)
    checkpoint = run / "checkpoints" / "3"
    shardvision = str(Path(sys.executable).parent / "shardvision")

    refused = subprocess.run(
        [shardvision, "export", str(checkpoint), str(tmp_path / "ours")], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "DeepSpeed checkpoint: its shards are Python pickles" in refused.stderr
    subprocess.run(
        [shardvision, "export", str(checkpoint), str(tmp_path / "ours"), "--allow-pickle"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            str(checkpoint / "zero_to_fp32.py"),
            str(checkpoint),
            str(tmp_path / "theirs"),
            "--safe_serialization",
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = (
        load_file(tmp_path / "ours" / "model.safetensors"),
        load_file(tmp_path / "theirs" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "ours" / "config.yaml").is_file()

    import timm

    from core.weights import load_weights

    load_weights(timm.create_model("resnet18", num_classes=10), str(tmp_path / "ours" / "model.safetensors"))  # strict


def test_ddp_export_equals_the_final_weights(ddp_reference, tmp_path):
    shardvision = str(Path(sys.executable).parent / "shardvision")
    subprocess.run(
        [shardvision, "export", str(ddp_reference / "checkpoints" / "22"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    a, b = load_file(tmp_path / "model.safetensors"), load_file(ddp_reference / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
