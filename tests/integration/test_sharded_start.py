"""Fine-tuning under ZeRO-3 starts sharded: the model is built partitioned (DeepSpeed's zero.Init)
and the weights file is streamed into its partitions, so no rank holds the whole model. Real
2-rank gloo launches with the repo's ZeRO-3 config, held to DDP and to the file itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, TINY_VIT, last_launch, launch, read_metrics

ZERO3 = dict(launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Trained weights of the small ViT (a few steps, one process): what a fine-tune starts from."""
    run = tmp_path_factory.mktemp("pretrained")
    launch([*TINY_VIT, "--loop.max_steps", "3", "--output-dir", str(run)], launcher="python")
    return run / "final" / "model.safetensors"


def test_zero3_evaluates_streamed_weights_as_ddp_does(weights, tmp_path):
    args = [*TINY_VIT, "--eval-only", "--weights", str(weights)]
    zero3 = launch([*args, "--output-dir", str(tmp_path / "zero3")], **ZERO3)
    assert f"ZeRO-3: model built partitioned (DeepSpeed zero.Init), {weights} streamed into it" in zero3.stderr
    launch([*args, "--output-dir", str(tmp_path / "ddp")], launcher="torchrun")
    got, expected = read_metrics(tmp_path / "zero3", "eval")[-1], read_metrics(tmp_path / "ddp", "eval")[-1]
    for metric in ("loss", "top1", "top5"):
        assert got[metric] == pytest.approx(expected[metric], rel=1e-5), metric


def test_zero3_fine_tune_loads_everything_but_the_excluded_head(weights, tmp_path):
    # An lr far below float resolution: the steps run (and checkpoint, export) but move no weight,
    # so the export shows exactly what was loaded.
    run = tmp_path / "run"
    args = [*TINY_VIT, "--weights", str(weights), "--model.weights_exclude", "['head.*']", "--optim.lr", "1e-30"]
    args += ["--loop.max_steps", "2", "--output-dir", str(run)]
    launch(args, **ZERO3)
    exported, original = load_file(run / "final" / "model.safetensors"), load_file(weights)
    assert exported.keys() == original.keys()
    for name, value in original.items():
        if name.startswith("head."):
            assert not torch.equal(exported[name], value), name  # started fresh
        else:
            assert torch.equal(exported[name], value), name
    startup = read_metrics(run, "startup")[-1]["peak_resident_mb_per_rank"]
    assert len(startup) == 2 and all(mb > 0 for mb in startup)

    launch([*args[:-4], "--loop.max_steps", "3", "--output-dir", str(run), "--resume", "auto"], **ZERO3)
    assert last_launch(run)["resumed_from"] == str(run / "checkpoints" / "2")
    assert json.loads((run / "final" / "metrics.json").read_text())["step"] == 3  # and went on


def test_zero3_refuses_a_file_that_does_not_fit_with_the_ddp_message(weights, tmp_path):
    state = load_file(weights)
    state["head.weight"] = torch.zeros(3, state["head.weight"].shape[1])
    misfit = tmp_path / "misfit.safetensors"
    save_file(state, misfit)
    proc = launch([*TINY_VIT, "--weights", str(misfit), "--output-dir", str(tmp_path / "run")], check=False, **ZERO3)
    assert proc.returncode != 0
    assert (
        f"{misfit} does not fit the model (shape mismatch: head.weight: file (3, 64) vs model (10, 64))" in proc.stderr
    )
