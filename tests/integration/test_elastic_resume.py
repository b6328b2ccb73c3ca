"""A checkpoint resumed on another cluster keeps its optimizer state: ZeRO-2 and ZeRO-3 at another
world size (converted once to DeepSpeed's universal checkpoint beside the original, then loaded by
DeepSpeed), and DDP <-> ZeRO-2/3 (the per-parameter state of core/portable.py). Real launches with the
repo's accelerate configs on 1 and 2 gloo ranks, the same global batch everywhere; each resumed run
is held to the uninterrupted 2-rank run of the strategy it ends under and, under ZeRO, to the
uninterrupted 2-rank DDP run as well: a flaw a ZeRO resume shares with the ZeRO reference (both go
through DeepSpeed) cannot hide from DDP."""

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
    ELASTIC,
    REPO,
    assert_follows_ddp,
    elastic_launch,
    last_launch,
    launch,
    read_metrics,
    run_env,
    run_killed_after_checkpoint,
    run_killed_when,
)

TOLERANCE = 1e-3  # relative, on the losses after the resume against the same layout: float sums in another order


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


def stopped_at_step_4(run_dir: Path, layout: str, nproc: int, reference, configs) -> Path:
    """A run of `layout` on `nproc` ranks that stopped after its checkpoint at step 4."""
    if nproc == 2:
        shutil.copytree(reference(layout) / "checkpoints" / "4", run_dir / "checkpoints" / "4")
    else:
        first = elastic_launch([*ELASTIC, "--output-dir", str(run_dir)], layout, nproc, configs)
        run_killed_after_checkpoint(first.pop("args"), run_dir, step=4, **first)
    return run_dir / "checkpoints" / "4"


def assert_continues_like(reference, layout: str, run_dir: Path, tmp_path: Path) -> None:
    """The steps after the resume follow the uninterrupted run of `layout`: a reset optimizer (Adam
    moments and step count from zero) moves the loss by far more than TOLERANCE within one step.
    And the state at the end equals that run's, parameter by parameter: step counts exactly, the rest
    to float noise. (The attention key bias has no gradient in exact arithmetic, so Adam moves it by
    normalised noise: up to 4e-6 apart here, while four steps at this lr move a weight by up to
    1.2e-2. Every other tensor agrees to 1e-6 relative.) Under ZeRO, also assert_follows_ddp."""
    reference_run = reference(layout)
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
    # The weight average went through the same change of ranks or strategy (resharded under ZeRO-3).
    expected_ema, resumed_ema = (load_file(run / "final" / "model_ema.safetensors") for run in (reference_run, run_dir))
    assert expected_ema.keys() == resumed_ema.keys()
    for name, value in expected_ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=1e-3, atol=1e-5, msg=f"EMA {name}")
    if layout != "ddp":
        assert_follows_ddp(reference("ddp"), run_dir)


# ZeRO-3 2 -> 4 ranks (micro-batch 16) and ZeRO-2 1 -> 2 ranks passed as cases of this test on
# 2026-11-30; they are left out of the suite for its time (four ranks on two cores cost a minute;
# ZeRO-2 1 -> 2 takes the paths of ZeRO-2 2 -> 1 and ZeRO-3 1 -> 2).
@pytest.mark.parametrize(
    "stage, before, after",
    [(2, 2, 1), (3, 2, 1), (3, 1, 2)],
    ids=["zero2-2-to-1-ranks", "zero3-2-to-1-ranks", "zero3-1-to-2-ranks"],
)
def test_zero_checkpoint_resumes_at_another_world_size_with_its_optimizer_state(
    elastic_reference, zero_configs, tmp_path, stage, before, after
):
    layout, run_dir = f"zero{stage}", tmp_path / "run"
    resume = [*ELASTIC, "--output-dir", str(run_dir), "--resume", "auto"]
    original = stopped_at_step_4(run_dir, layout, before, elastic_reference, zero_configs)
    manifest_before = (original / "manifest.json").read_text()
    if (stage, after) == (2, 1):  # a conversion SIGKILLed half-way leaves nothing published, and nothing broken
        converting = elastic_launch(resume, layout, after, zero_configs)
        run_killed_when(converting.pop("args"), run_dir / "checkpoints" / ".tmp-universal-4", **converting)
        assert not (run_dir / "checkpoints" / "universal-4").exists()

    second = elastic_launch(resume, layout, after, zero_configs)
    launch(second.pop("args"), **second)

    run = last_launch(run_dir)
    assert (run["world_size"], run["zero_stage"], run["resumed_from"]) == (after, stage, str(original))
    universal = run_dir / "checkpoints" / "universal-4"
    assert json.loads((universal / "manifest.json").read_text())["files"]  # published with a manifest
    assert (original / "manifest.json").read_text() == manifest_before  # the original untouched
    assert_continues_like(elastic_reference, layout, run_dir, tmp_path)


# A change of ZeRO stage (ZeRO-2 -> ZeRO-3 here) takes the same path through the per-parameter state;
# run as a case of this test on 2026-11-30 (passed), left out of the suite for its time.
@pytest.mark.parametrize(
    "saved, resumed",
    [("ddp", "zero2"), ("zero2", "ddp"), ("ddp", "zero3"), ("zero3", "ddp")],
    ids=["ddp-to-zero2", "zero2-to-ddp", "ddp-to-zero3", "zero3-to-ddp"],
)
def test_checkpoint_resumes_under_another_strategy_with_its_optimizer_state(
    elastic_reference, zero_configs, tmp_path, saved, resumed
):
    run_dir = tmp_path / "run"
    original = stopped_at_step_4(run_dir, saved, 2, elastic_reference, zero_configs)
    go_on = elastic_launch([*ELASTIC, "--output-dir", str(run_dir), "--resume", "auto"], resumed, 2, zero_configs)
    proc = launch(go_on.pop("args"), **go_on)
    assert f"loaded the {saved} state of {original} into {resumed}, parameter by parameter" in proc.stderr
    assert last_launch(run_dir)["resumed_from"] == str(original)
    assert_continues_like(elastic_reference, resumed, run_dir, tmp_path)


def test_zero3_keeps_the_weight_average_sharded_and_it_equals_ddps(elastic_reference, tmp_path):
    """The same seed and batches under DDP and ZeRO-3 (2 ranks each): ZeRO-3 averages each rank's
    own partition, never the whole model, yet the exported average, and the evaluation with it,
    are DDP's (to float noise: the gradients are reduced in another order)."""
    ddp, zero3 = elastic_reference("ddp"), elastic_reference("zero3")
    shards = sorted((zero3 / "checkpoints" / "8").glob("ema-rank*-of-00002.safetensors"))
    assert [s.name for s in shards] == ["ema-rank00000-of-00002.safetensors", "ema-rank00001-of-00002.safetensors"]
    exported = load_file(zero3 / "final" / "model_ema.safetensors")
    parameters = sum(v.numel() for v in exported.values())
    for shard in shards:  # each rank keeps about half of the average (ZeRO-3 pads a partition to split evenly)
        kept = sum(v.numel() for k, v in load_file(shard).items() if not k.startswith("buffer:"))
        assert parameters / 2 <= kept < parameters / 2 + 1000, (shard.name, kept, parameters)

    # The run row counts the whole model, and what this rank stores of it (not 0 under ZeRO-3).
    ddp_run, zero3_run = last_launch(ddp), last_launch(zero3)
    assert zero3_run["parameters"] == ddp_run["parameters"] == ddp_run["parameters_on_this_rank"] > 0
    assert zero3_run["parameters"] / 2 <= zero3_run["parameters_on_this_rank"] < zero3_run["parameters"] / 2 + 1000

    expected = load_file(ddp / "final" / "model_ema.safetensors")
    assert exported.keys() == expected.keys()
    # atol: the attention key bias, moved by noise (see above): 1.3e-6 apart in the average, 5.6e-6 in
    # the weights; every other tensor agrees to 3e-7. The average and the weights are ~1e-2 apart.
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # The weights exported after the evaluation with the average are the trained ones again, DDP's.
    final, ddp_final = load_file(zero3 / "final" / "model.safetensors"), load_file(ddp / "final" / "model.safetensors")
    for name, value in ddp_final.items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(final[k], exported[k]) for k in final)  # an average, not the last weights
    # `shardvision export` reassembles the average from a checkpoint's per-rank files, without the model.
    shardvision = str(Path(sys.executable).parent / "shardvision")
    subprocess.run(
        [shardvision, "export", str(zero3 / "checkpoints" / "8"), str(tmp_path), "--allow-pickle"],
        check=True,
        capture_output=True,
    )
    from_checkpoint = load_file(tmp_path / "model_ema.safetensors")
    assert from_checkpoint.keys() == exported.keys()
    assert all(torch.equal(from_checkpoint[k], exported[k]) for k in exported)  # step 8: the run's end

    ddp_eval, zero3_eval = read_metrics(ddp, "eval")[-1], read_metrics(zero3, "eval")[-1]
    assert zero3_eval["ema_loss"] == pytest.approx(ddp_eval["ema_loss"], rel=1e-4)
    assert zero3_eval["ema_loss"] != pytest.approx(zero3_eval["loss"], rel=1e-4)  # evaluated with the average
