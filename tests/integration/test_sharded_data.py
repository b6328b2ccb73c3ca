"""Training on tar shards (data.source webdataset), written by the test with tarfile alone: a 2-rank
run killed mid-epoch and resumed with 2 loader workers retraces the uninterrupted DDP run bit for
bit; resumed on 1 rank (accumulation 2, the same global batch) it trains each step on the samples
the uninterrupted run did, none repeated in the epoch; evaluation counts each sample once. Each
rank's samples are recorded by tests/recording_train.py. The same samples as Parquet shards
written by `datasets` (data.source parquet) retrace the same run through a kill and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.builders import digit_parquet, digit_shards
from tests.helpers import (
    REPO,
    STOPPED_AT_3_OF_6,
    TINY_VIT,
    assert_resumed_exactly,
    final_weights_equal,
    last_launch,
    launch,
    read_metrics,
    run_killed_after_checkpoint,
    samples_per_step,
    train_losses,
)

RECORDING = str(REPO / "tests" / "recording_train.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return digit_shards(tmp_path_factory.mktemp("digit_shards"))


def sharded(shards: Path) -> list[str]:
    """The tiny ViT on the digit shards, global batch 64 in 4 parts, checkpointed at step 3 of 6."""
    source = ["--data.source", "webdataset", "--data.root", str(shards)]
    return [*TINY_VIT, *source, "--data.shard_partitions", "4", "--data.shuffle_window", "50", *STOPPED_AT_3_OF_6]


@pytest.fixture(scope="module")
def reference(shards, uninterrupted) -> Path:
    """The uninterrupted 2-rank DDP run, loading in the main process."""
    return uninterrupted([*sharded(shards), "--data.num_workers", "0"], launcher="torchrun", script=RECORDING)


def test_killed_mid_epoch_resumes_bit_for_bit_with_two_loader_workers(shards, reference, tmp_path):
    args = [*sharded(shards), "--data.num_workers", "2", "--output-dir", str(tmp_path)]
    run_killed_after_checkpoint(args, tmp_path, step=3, launcher="torchrun", script=RECORDING)
    launch([*args, "--resume", "auto"], launcher="torchrun", script=RECORDING)
    assert_resumed_exactly(tmp_path, reference, 3)
    evaluation, expected = read_metrics(tmp_path, "eval")[-1], read_metrics(reference, "eval")[-1]
    assert evaluation["samples"] == 360  # the 360 validation samples in 2 shards, each counted once over 2 ranks
    for key in ("step", "loss", "top1", "top5"):
        assert evaluation[key] == expected[key], key


def test_parquet_shards_resume_mid_epoch_on_the_tar_runs_path_with_two_loader_workers(reference, tmp_path):
    """The order depends on the shards' sample counts only, so Parquet shards written by `datasets`
    holding the same samples (in row groups of 100, not aligned with the 240-sample shards),
    resumed from the tar run's mid-epoch checkpoint, retrace the uninterrupted tar run: a resume
    reads from the middle of the epoch, so every sample is where the tar shards have it. (The kill
    itself is the tar test's above: what a kill leaves does not depend on the data's format.)"""
    parquet, run = digit_parquet(tmp_path / "parquet"), tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "3", run / "checkpoints" / "3")
    source = ["--data.source", "parquet", "--data.root", str(parquet), "--data.num_workers", "2"]
    args = [*TINY_VIT, *source, "--data.shard_partitions", "4", "--data.shuffle_window", "50", *STOPPED_AT_3_OF_6]
    launch([*args, "--output-dir", str(run), "--resume", "auto"], launcher="torchrun")
    assert last_launch(run)["resumed_from"] == str(run / "checkpoints" / "3")
    expected = train_losses(reference)
    assert train_losses(run) == {step: [expected[step][0]] for step in (4, 5, 6)}
    assert read_metrics(run, "eval")[-1] == read_metrics(reference, "eval")[-1] and final_weights_equal(reference, run)


def test_resumed_on_one_rank_trains_on_the_samples_of_the_uninterrupted_run(shards, reference, tmp_path, monkeypatch):
    """The 2-rank run's checkpoint 3 resumed on 1 rank with accumulation 2: steps 4-6 train on
    the samples the 2-rank run's did, the epoch repeats none, and the losses follow."""
    expected = samples_per_step(reference, "run", 2, 1, 0)
    seen = sum(expected.values(), [])
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and len(seen) == len(set(seen)) == 6 * 64
    for rank in (0, 1):  # each rank reads its 2 of the 4 parts: a few of the 6 shards of 240, not all
        lines = (reference / f"samples-run-rank{rank}.jsonl").read_text().splitlines()
        assert len({n // 240 for line in lines for n in json.loads(line)}) <= 4, rank
    shutil.copytree(reference / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    monkeypatch.setenv("RECORD_TAG", "one-rank")
    args = [*sharded(shards), "--data.num_workers", "0", "--loop.grad_accum_steps", "2", "--output-dir", str(tmp_path)]
    launch([*args, "--resume", "auto"], launcher="torchrun", nproc=1, script=RECORDING)
    assert (last_launch(tmp_path)["world_size"], last_launch(tmp_path)["resumed_from"]) == (
        1,
        str(tmp_path / "checkpoints" / "3"),
    )
    assert samples_per_step(tmp_path, "one-rank", 1, 2, 3) == {step: expected[step] for step in (4, 5, 6)}
    losses, expected_losses = train_losses(tmp_path), train_losses(reference)
    for step in (4, 5, 6):
        assert losses[step][-1] == pytest.approx(expected_losses[step][0], rel=1e-4), step
