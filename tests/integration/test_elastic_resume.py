"""A ZeRO-2 checkpoint resumed at another world size keeps its optimizer state: converted once to
DeepSpeed's universal checkpoint beside the original, then loaded. Real accelerate launches with
the repo's ZeRO configs on 1 and 2 gloo ranks, the same global batch either way. (ZeRO-3 is
refused, tested in test_distributed_runs.py: run through this test on 2026-11-30, the universal
form of its 2-rank checkpoint equalled a 1-rank run's state to 1e-3, yet after DeepSpeed's ZeRO-3
universal load and four steps exp_avg was up to 9% of its largest value off the uninterrupted run.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    DIGITS,
    QUICK,
    REPO,
    last_launch,
    launch,
    read_metrics,
    run_env,
    run_killed_after_checkpoint,
    run_killed_when,
)

# LayerNorm ViT (no batch statistics, which would differ between 1x64 and 2x32 samples per rank),
# no dropout, AdamW: the moments are what a resume must keep.
ELASTIC = [
    "--config",
    DIGITS,
    *QUICK,
    "--model.name",
    "test_vit",
    "--model.kwargs",
    "{img_size: 32}",
    "--optim.name",
    "adamw",
    "--optim.lr",
    "0.003",
    "--loop.max_steps",
    "8",
    "--logging.every_steps",
    "1",
    "--checkpoint.every_steps",
    "4",
    "--checkpoint.at_epoch_end",
    "false",
    "--checkpoint.export_final",
    "false",
]
MICRO = {1: "64", 2: "32"}  # a global batch of 64 at either world size
TOLERANCE = 1e-3  # relative, on the losses after the resume: float sums in another order, no more


def zero_launch(args: list[str], stage: int, nproc: int) -> dict:
    config = str(REPO / "accelerate_configs" / f"deepspeed_zero{stage}.yaml")
    return dict(
        args=[*args, "--data.micro_batch_size", MICRO[nproc]],
        launcher="accelerate",
        accelerate_config=config,
        nproc=nproc,
    )


def universal_state(checkpoint: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 weight, Adam moments and step, consolidated by DeepSpeed's own
    converter into one file per parameter and state: the same layout whatever the world size."""
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"]
    convert += ["--input_folder", str(checkpoint / "pytorch_model"), "--output_folder", str(out)]
    subprocess.run(convert, cwd=REPO, env=run_env(), check=True, capture_output=True)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name in os.listdir(out / "zero"):
        for kind in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            path = out / "zero" / name / f"{kind}.pt"
            if path.is_file():
                saved = torch.load(path, weights_only=True)  # noqa: TID251 (tensors only)
                state.setdefault(name, {})[kind] = saved["param"] if isinstance(saved, dict) else saved
    return state


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir, "train")}  # the last row of each step


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[int, Path]:
    """An uninterrupted 2-rank run per ZeRO stage: the trajectory and final state to reproduce."""
    runs = {}
    for stage in (2,):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}_reference")
        kwargs = zero_launch([*ELASTIC, "--output-dir", str(run_dir)], stage, nproc=2)
        launch(kwargs.pop("args"), **kwargs)
        runs[stage] = run_dir
    return runs


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)], ids=["2-to-1-ranks", "1-to-2-ranks"])
def test_zero2_checkpoint_resumes_at_another_world_size_with_its_optimizer_state(references, tmp_path, before, after):
    stage = 2
    run_dir = tmp_path / "run"
    args = [*ELASTIC, "--output-dir", str(run_dir)]
    first = zero_launch(args, stage, before)
    run_killed_after_checkpoint(first.pop("args"), run_dir, step=4, **first)
    original = run_dir / "checkpoints" / "4"
    manifest_before = (original / "manifest.json").read_text()
    if after == 1:  # a conversion SIGKILLed half-way leaves nothing published, and nothing broken
        converting = zero_launch([*args, "--resume", "auto"], stage, after)
        run_killed_when(converting.pop("args"), run_dir / "checkpoints" / ".tmp-universal-4", **converting)
        assert not (run_dir / "checkpoints" / "universal-4").exists()

    second = zero_launch([*args, "--resume", "auto"], stage, after)
    launch(second.pop("args"), **second)

    run = last_launch(run_dir)
    assert (run["world_size"], run["zero_stage"], run["resumed_from"]) == (after, stage, str(original))
    universal = run_dir / "checkpoints" / "universal-4"
    assert json.loads((universal / "manifest.json").read_text())["files"]  # published with a manifest
    assert (original / "manifest.json").read_text() == manifest_before  # the original untouched

    # The steps after the resume follow the uninterrupted run: a reset optimizer (Adam moments and
    # step count from zero) moves the loss by far more than TOLERANCE within one step.
    reference, got = losses(references[stage]), losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(reference[step], rel=TOLERANCE), (step, got[step], reference[step])

    # And the optimizer state at the end equals the uninterrupted run's, parameter by parameter: the
    # step counts exactly; the rest to float noise. (The attention key bias has no gradient in
    # exact arithmetic, so Adam moves it by normalised noise: up to 4e-6 apart here, while four
    # steps at this lr move a weight by up to 1.2e-2. Every other tensor agrees to 1e-6 relative.)
    expected = universal_state(references[stage] / "checkpoints" / "8", tmp_path / "expected")
    resumed = universal_state(run_dir / "checkpoints" / "8", tmp_path / "resumed")
    assert expected.keys() == resumed.keys() and expected
    for name, states in expected.items():
        assert states.keys() == resumed[name].keys(), name
        for kind, value in states.items():
            torch.testing.assert_close(resumed[name][kind], value, rtol=1e-3, atol=1e-5, msg=f"{name} {kind}")
