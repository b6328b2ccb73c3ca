"""A checkpoint resumed on another cluster keeps its optimizer state: ZeRO-2 and ZeRO-3 at another
world size (converted once to DeepSpeed's universal checkpoint beside the original, then loaded by
DeepSpeed), and DDP <-> ZeRO-2 (the per-parameter state of core/portable.py). Real launches with the
repo's accelerate configs on 1 and 2 gloo ranks, the same global batch everywhere; each resumed run
is held to the uninterrupted 2-rank run of the strategy it ends under."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def layout_launch(args: list[str], layout: str, nproc: int) -> dict:
    """Launch arguments for a run under `layout` (ddp: torchrun; zero2/zero3: accelerate and the
    repo's config) on `nproc` ranks, with the micro-batch that keeps the global batch at 64."""
    args = [*args, "--data.micro_batch_size", MICRO[nproc]]
    if layout == "ddp":
        return dict(args=args, launcher="torchrun", nproc=nproc)
    config = str(REPO / "accelerate_configs" / f"deepspeed_{layout}.yaml")
    return dict(args=args, launcher="accelerate", accelerate_config=config, nproc=nproc)


def final_state(checkpoint: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 weight, optimizer moments and step. ZeRO: consolidated by DeepSpeed's
    own converter (one file per parameter and state, the same whatever the world size). DDP: the
    weights by name and the optimizer state by its index, which both runs compared share."""
    if not (checkpoint / "pytorch_model").is_dir():
        state = {name: {"fp32": t} for name, t in load_file(checkpoint / "model.safetensors").items()}
        saved = torch.load(checkpoint / "optimizer.bin", weights_only=True)  # noqa: TID251 (tensors only)
        return state | {f"optimizer state {i}": dict(values) for i, values in saved["state"].items()}
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"]
    convert += ["--input_folder", str(checkpoint / "pytorch_model"), "--output_folder", str(out)]
    subprocess.run(convert, cwd=REPO, env=run_env(), check=True, capture_output=True)
    state = {}
    for name in os.listdir(out / "zero"):
        for kind in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            path = out / "zero" / name / f"{kind}.pt"
            if path.is_file():
                saved = torch.load(path, weights_only=True)  # noqa: TID251 (tensors only)
                state.setdefault(name, {})[kind] = saved["param"] if isinstance(saved, dict) else saved
    if not any("step" in kinds for kinds in state.values()):  # ZeRO-3 keeps the step once, for every group
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
            common = torch.load(out / "zero" / "optimizer_state.pt", weights_only=True)  # noqa: TID251
        state["step of every group"] = {str(i): s["step"] for i, s in common["optimizer_state_dict"]["state"].items()}
    return state


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir, "train")}  # the last row of each step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run of a layout (ddp, zero2, zero3), run once when first asked for:
    the trajectory and final state a resumed run must reproduce. Its checkpoint at step 4 is what a
    2-rank run stopped after step 4 leaves behind, so the tests start their resumes from a copy."""
    runs: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in runs:
            run_dir = tmp_path_factory.mktemp(f"{layout}_reference")
            kwargs = layout_launch([*ELASTIC, "--output-dir", str(run_dir)], layout, nproc=2)
            launch(kwargs.pop("args"), **kwargs)
            runs[layout] = run_dir
        return runs[layout]

    return get


def stopped_at_step_4(run_dir: Path, layout: str, nproc: int, reference) -> Path:
    """A run of `layout` on `nproc` ranks that stopped after its checkpoint at step 4."""
    if nproc == 2:
        shutil.copytree(reference(layout) / "checkpoints" / "4", run_dir / "checkpoints" / "4")
    else:
        first = layout_launch([*ELASTIC, "--output-dir", str(run_dir)], layout, nproc)
        run_killed_after_checkpoint(first.pop("args"), run_dir, step=4, **first)
    return run_dir / "checkpoints" / "4"


def assert_continues_like(reference_run: Path, run_dir: Path, tmp_path: Path) -> None:
    """The steps after the resume follow the uninterrupted run: a reset optimizer (Adam moments and
    step count from zero) moves the loss by far more than TOLERANCE within one step. And the state
    at the end equals the uninterrupted run's, parameter by parameter: step counts exactly, the rest
    to float noise. (The attention key bias has no gradient in exact arithmetic, so Adam moves it by
    normalised noise: up to 4e-6 apart here, while four steps at this lr move a weight by up to
    1.2e-2. Every other tensor agrees to 1e-6 relative.)"""
    expected_losses, got = losses(reference_run), losses(run_dir)
    assert max(got) == 8 and set(range(5, 9)) <= set(got)
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected_losses[step], rel=TOLERANCE), (step, got[step], expected_losses)
    expected = final_state(reference_run / "checkpoints" / "8", tmp_path / "expected")
    resumed = final_state(run_dir / "checkpoints" / "8", tmp_path / "resumed")
    assert expected.keys() == resumed.keys() and expected
    for name, states in expected.items():
        assert states.keys() == resumed[name].keys(), name
        for kind, value in states.items():
            torch.testing.assert_close(resumed[name][kind], value, rtol=1e-3, atol=1e-5, msg=f"{name} {kind}")


@pytest.mark.parametrize(
    "stage, before, after",
    [(2, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2)],
    ids=["zero2-2-to-1-ranks", "zero2-1-to-2-ranks", "zero3-2-to-1-ranks", "zero3-1-to-2-ranks"],
)
def test_zero_checkpoint_resumes_at_another_world_size_with_its_optimizer_state(
    reference, tmp_path, stage, before, after
):
    layout, run_dir = f"zero{stage}", tmp_path / "run"
    resume = [*ELASTIC, "--output-dir", str(run_dir), "--resume", "auto"]
    original = stopped_at_step_4(run_dir, layout, before, reference)
    manifest_before = (original / "manifest.json").read_text()
    if (stage, after) == (2, 1):  # a conversion SIGKILLed half-way leaves nothing published, and nothing broken
        converting = layout_launch(resume, layout, after)
        run_killed_when(converting.pop("args"), run_dir / "checkpoints" / ".tmp-universal-4", **converting)
        assert not (run_dir / "checkpoints" / "universal-4").exists()

    second = layout_launch(resume, layout, after)
    launch(second.pop("args"), **second)

    run = last_launch(run_dir)
    assert (run["world_size"], run["zero_stage"], run["resumed_from"]) == (after, stage, str(original))
    universal = run_dir / "checkpoints" / "universal-4"
    assert json.loads((universal / "manifest.json").read_text())["files"]  # published with a manifest
    assert (original / "manifest.json").read_text() == manifest_before  # the original untouched
    assert_continues_like(reference(layout), run_dir, tmp_path)


@pytest.mark.parametrize("saved, resumed", [("ddp", "zero2"), ("zero2", "ddp")], ids=["ddp-to-zero2", "zero2-to-ddp"])
def test_checkpoint_resumes_under_another_strategy_with_its_optimizer_state(reference, tmp_path, saved, resumed):
    run_dir = tmp_path / "run"
    original = stopped_at_step_4(run_dir, saved, 2, reference)
    go_on = layout_launch([*ELASTIC, "--output-dir", str(run_dir), "--resume", "auto"], resumed, nproc=2)
    proc = launch(go_on.pop("args"), **go_on)
    assert f"loaded the {saved} state of {original} into {resumed}, parameter by parameter" in proc.stderr
    assert last_launch(run_dir)["resumed_from"] == str(original)
    assert_continues_like(reference(resumed), run_dir, tmp_path)
