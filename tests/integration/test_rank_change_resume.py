"""A run resumed mid-epoch on another number of ranks trains on the samples the uninterrupted run
would have: each optimizer step's samples are recorded (tests/recording_train.py) and held to
uninterrupted DDP runs of both sizes, the same seed and the same global batch of 64 (2 ranks x 32,
or 1 rank x 32 x accumulation 2), and so are the losses. DDP through torchrun; ZeRO through
accelerate with the repo's configs, converted to DeepSpeed's universal checkpoint on the way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    STOPPED_AT_3_OF_6,
    TINY_VIT,
    accelerate_config,
    last_launch,
    launch,
    run_killed_after_checkpoint,
    samples_per_step,
    train_losses,
)

RECORDING = str(REPO / "tests" / "recording_train.py")
# A LayerNorm ViT without dropout, so a step's update depends only on which samples it sees.
RESUMED = [*TINY_VIT, "--optim.name", "adamw", "--optim.lr", "0.003", *STOPPED_AT_3_OF_6]
ACCUMULATION = {1: "2", 2: "1"}  # ranks -> accumulation steps: a global batch of 64 either way


def launch_kwargs(layout: str, nproc: int) -> dict:
    if layout == "ddp":
        return dict(launcher="torchrun", nproc=nproc, script=RECORDING)
    config = accelerate_config(f"deepspeed_{layout}.yaml")
    return dict(launcher="accelerate", accelerate_config=config, nproc=nproc, script=RECORDING)


def geometry(nproc: int) -> list[str]:
    return ["--loop.grad_accum_steps", ACCUMULATION[nproc]]


def recorded(run_dir: Path, tag: str, nproc: int, first_step: int) -> dict[int, list[int]]:
    return samples_per_step(run_dir, tag, nproc, int(ACCUMULATION[nproc]), first_step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, monkeypatch_module) -> dict[int, tuple[dict, dict, Path]]:
    """Uninterrupted DDP runs on 1 and 2 ranks: (samples of each step, losses of each step, folder)."""
    runs = {}
    monkeypatch_module.setenv("RECORD_TAG", "whole")
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"uninterrupted_{nproc}")
        launch([*RESUMED, *geometry(nproc), "--output-dir", str(run_dir)], **launch_kwargs("ddp", nproc))
        runs[nproc] = recorded(run_dir, "whole", nproc, 0), train_losses(run_dir), run_dir
    assert runs[1][0] == runs[2][0] and sorted(runs[1][0]) == list(range(1, 7)), "1 and 2 ranks see one order"
    return runs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize(
    "layout, before, after",
    [("ddp", 2, 1), ("ddp", 1, 2), ("zero2", 2, 1), ("zero3", 1, 2)],
    ids=["ddp-2-to-1", "ddp-1-to-2", "zero2-2-to-1", "zero3-1-to-2"],
)
def test_resume_on_another_number_of_ranks_trains_on_the_same_samples(
    uninterrupted, monkeypatch, tmp_path, layout, before, after
):
    args = [*RESUMED, "--output-dir", str(tmp_path)]
    expected_samples, expected_losses, reference = uninterrupted[2]
    if (layout, before) == ("ddp", 2):
        # What a 2-rank DDP launch stopped after step 3 leaves is the uninterrupted run's checkpoint 3.
        shutil.copytree(reference / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
        got, first_logged = {step: expected_samples[step] for step in (1, 2, 3)}, 4
    else:
        monkeypatch.setenv("RECORD_TAG", "before")
        run_killed_after_checkpoint([*args, *geometry(before)], tmp_path, step=3, **launch_kwargs(layout, before))
        got = recorded(tmp_path, "before", before, 0)
        got, first_logged = {step: got[step] for step in (1, 2, 3)}, 1  # it may have gone past its checkpoint
    monkeypatch.setenv("RECORD_TAG", "after")
    launch([*args, *geometry(after), "--resume", "auto"], **launch_kwargs(layout, after))
    run = last_launch(tmp_path)
    assert (run["world_size"], run["resumed_from"]) == (after, str(tmp_path / "checkpoints" / "3"))

    got |= recorded(tmp_path, "after", after, 3)
    assert got == expected_samples

    # The same samples, the same weights: the losses follow the uninterrupted DDP run's (DDP to
    # float noise; ZeRO's reductions and Adam's normalisation of near-zero gradients a little more).
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(first_logged, 7))
    tolerance = 1e-4 if layout == "ddp" else 1e-3
    for step in range(4, 7):
        assert losses[step][-1] == pytest.approx(expected_losses[step][0], rel=tolerance), step
