"""The segmentation recipe end to end: 2 gloo ranks on the synthetic shapes (real JPEG/PNG files
through the VOC loader), killed and resumed, against an untrained baseline; 2-rank evaluation
against 1 process; ZeRO-3."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.segmentation.task import SegmentationConfig, SegmentationTask
from tests.helpers import REPO, assert_export_is_whole, last_launch, launch, read_metrics, run_killed_after_checkpoint

SEGMENT = "recipes/segmentation/train.py"
SHAPES = [
    "--config",
    "recipes/segmentation/configs/shapes.yaml",
    "--logging.progress_bar",
    "false",
    "--logging.trackers",
    "[]",
]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """The demo config, killed after a mid-run checkpoint, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("shapes")
    args = [*SHAPES, "--output-dir", str(run_dir), "--loop.eval_at_start", "true", "--checkpoint.every_steps", "150"]
    # a metric run: evaluated untrained and at the end only, checkpointed for the kill only
    args += ["--loop.eval_every_epochs", "0", "--checkpoint.at_epoch_end", "false"]
    run_killed_after_checkpoint(args, run_dir, step=150, launcher="torchrun", script=SEGMENT)
    launch([*args, "--resume", "auto"], launcher="torchrun", script=SEGMENT)
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"]) == (2, "ddp") and run["resumed_from"].endswith("checkpoints/150")
    assert any(key.startswith("IoU/") for key in read_metrics(run_dir, "eval")[-1])  # per-class results
    return run_dir


def test_trains_resumes_and_beats_the_untrained_model(shapes_run):
    rows = read_metrics(shapes_run, "eval")
    untrained = [r for r in rows if r["step"] == 0][0]
    final = rows[-1]
    assert final["images"] == untrained["images"] == 50  # every val image once over 2 ranks
    assert final["mIoU"] >= untrained["mIoU"] + 30, (untrained["mIoU"], final["mIoU"])
    assert final["mIoU"] >= 60, final
    steps = sorted({r["step"] for r in read_metrics(shapes_run, "train")})
    assert steps[0] == 5 and steps[-1] == final["step"]
    assert (shapes_run / "final" / "model.safetensors").is_file()


def test_two_rank_evaluation_equals_one_process(shapes_run, tmp_path):
    """Eval batch 3: both runs form the same batches (accelerate shards whole batches), and the
    last one is padded on 2 ranks; per-image confusion matrices must add up identically. (That an
    eval-only run, which ends right after a gather, exits 0 is test_failure_runs.py's stress test.)"""
    common = [
        *SHAPES,
        "--eval-only",
        "--weights",
        str(shapes_run / "final" / "model.safetensors"),
        "--data.eval_micro_batch_size",
        "3",
    ]
    launch([*common, "--output-dir", str(tmp_path / "one")], launcher="python", script=SEGMENT)
    one = read_metrics(tmp_path / "one", "eval")[-1]
    launch([*common, "--output-dir", str(tmp_path / "two")], launcher="torchrun", script=SEGMENT)
    two = read_metrics(tmp_path / "two", "eval")[-1]
    assert two["images"] == one["images"] == 50
    for key in ("mIoU", "pixel_acc", "mean_acc", "IoU/background", "IoU/square", "IoU/circle", "IoU/triangle"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_zero3_trains_checkpoints_resumes_and_exports(tmp_path):
    """ZeRO-3 in bf16 (ZeRO-2 ran here until it was replaced: ZeRO-3 takes the same path and
    partitions the weights as well)."""
    kwargs = dict(
        launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs/deepspeed_zero3.yaml"), script=SEGMENT
    )
    args = [
        *SHAPES,
        "--output-dir",
        str(tmp_path),
        "--loop.max_steps",
        "16",
        "--checkpoint.every_steps",
        "10",
        "--loop.precision",
        "bf16",
        # torchvision's DeepLabV3 with its auxiliary head, BatchNorm buffers cast to bf16 with the weights
        "--model.source",
        "torchvision",
        "--model.name",
        "deeplabv3_mobilenet_v3_large",
    ]
    run_killed_after_checkpoint(args, tmp_path, step=10, **kwargs)
    assert (tmp_path / "checkpoints" / "10" / "pytorch_model").is_dir()
    launch([*args, "--resume", "auto"], **kwargs)
    run = last_launch(tmp_path)
    assert (run["strategy"], run["zero_stage"], run["precision"]) == ("deepspeed", 3, "bf16")
    assert run["resumed_from"].endswith("checkpoints/10")
    total = run["total_steps"]
    assert read_metrics(tmp_path, "eval")[-1]["step"] == total
    model = args[args.index("--model.source") :]
    assert_export_is_whole(
        tmp_path / "final" / "model.safetensors", SegmentationConfig, SegmentationTask, SHAPES + model
    )
