"""The classification recipe through the launchers a user types (torchrun, accelerate launch with
the repo's configs, the deepspeed launcher, python and python -m) on 2 gloo ranks: the README's
demo reaching 95 %, 2-rank evaluation equal to one process's, bf16 under ZeRO-2 and CPU autocast,
and a bad option refused with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    DIGITS,
    TINY_VIT,
    accelerate_config,
    last_launch,
    launch,
    read_metrics,
)


def test_demo_reaches_95_percent(tmp_path):
    """The README's demo: digits, 2 ranks, default config."""
    launch(["--config", DIGITS, "--output-dir", str(tmp_path), "--logging.progress_bar", "false"], launcher="torchrun")
    metrics = json.load(open(tmp_path / "final" / "metrics.json"))
    assert metrics["top1"] >= 95.0, metrics
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    rows = read_metrics(tmp_path, "eval")
    assert {"step", "epoch", "split", "loss", "top1", "top5"} <= set(rows[-1])


def eval_row(run_dir: Path) -> dict:
    return read_metrics(run_dir, "eval")[-1]


def test_two_rank_evaluation_equals_one_process(ddp_reference, tmp_path):
    """Eval batch 7 leaves 360 samples unevenly split over 2 ranks: accelerate pads the last
    batch, and each sample must still count exactly once."""
    weights = str(ddp_reference / "final" / "model.safetensors")
    common = [*TINY_VIT, "--eval-only", "--weights", weights, "--data.eval_micro_batch_size", "7"]
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


def test_fast_decode_scores_the_same_weights_alike(ddp_reference):
    """data.fast_decode's uint8 evaluation images, normalised by the task's on_device as the
    trainer calls it, score the run's final weights within a point of its own (PIL) evaluation
    (images within 2/255, see test_data; in process: the engine path is the ZeRO-2 run's below)."""
    import torch
    from safetensors.torch import load_file

    from core.config_parsing import parse_args
    from recipes.classification.task import ClassificationConfig, ClassificationTask

    config = ["--config", str(ddp_reference / "final" / "config.yaml"), "--data.fast_decode", "true"]
    task = ClassificationTask(parse_args(ClassificationConfig, config))
    model = task.build_model().eval()
    model.load_state_dict(load_file(ddp_reference / "final" / "model.safetensors"))
    evaluation = task.build_datasets()[1]
    batch = task.on_device(task.collate([evaluation[i] for i in range(len(evaluation))]))
    assert batch["image"].dtype == torch.float32
    with torch.no_grad():
        outputs = task.evaluation_step(model, batch)
    top1 = 100 * (outputs["topk"][:, 0] == outputs["target"]).float().mean().item()
    pil = json.load(open(ddp_reference / "final" / "metrics.json"))
    assert len(evaluation) == 360 and abs(top1 - pil["top1"]) <= 1.0, (top1, pil)
    assert outputs["loss"].mean().item() == pytest.approx(pil["loss"], rel=0.02)


def test_deepspeed_launcher_and_python_module_in_bf16(tmp_path):
    """The suite's bf16 run under ZeRO-2 and its single-process one (CPU autocast): the tiny ViT,
    since bf16 matmuls on CPU are slow and what is proven is the launch and the precision, not
    learning. No FLOP count: one more bf16 forward at start-up. The ZeRO-2 run decodes with
    data.fast_decode: its uint8 images are normalised before they are cast to the bf16 weights."""
    common = [*TINY_VIT, "--loop.max_steps", "2", "--loop.precision", "bf16", "--logging.count_flops", "false"]
    zero2 = ["--distributed.deepspeed_config", "ds_configs/zero2.json", "--data.fast_decode", "true"]
    launch([*common, "--output-dir", str(tmp_path / "ds"), *zero2], launcher="deepspeed")
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
