"""The segmentation recipe end to end: 2 gloo ranks on the synthetic shapes (real JPEG/PNG files
through the VOC loader), killed and resumed as if never stopped, against an untrained baseline;
2-rank evaluation against 1 process; ZeRO-3."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config_parsing import parse_args
from recipes.segmentation.task import SegmentationConfig, SegmentationTask
from tests.helpers import (
    REPO,
    assert_export_is_whole,
    docs_snippet,
    last_launch,
    launch,
    read_metrics,
    run_killed_after_checkpoint,
    start,
    train_losses,
    without_shardvision,
)

SEGMENT = "recipes/segmentation/train.py"
SHAPES = [
    "--config",
    "recipes/segmentation/configs/shapes.yaml",
    "--logging.progress_bar",
    "false",
    "--logging.trackers",
    "[]",
    # the demo's 96 px costs twice as much a step; at 64 px its 60 epochs still reach mIoU 74 (from 4)
    "--data.image_size",
    "64",
]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """The demo config, killed 5 steps after a mid-run checkpoint, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("shapes")
    args = [*SHAPES, "--output-dir", str(run_dir), "--loop.eval_at_start", "true", "--checkpoint.every_steps", "150"]
    # a metric run: evaluated untrained and at the end only, checkpointed for the kill only
    args += ["--loop.eval_every_epochs", "0", "--checkpoint.at_epoch_end", "false", "--logging.every_steps", "1"]
    args += ["--data.eval_micro_batch_size", "3"]  # its last evaluation: the 2-rank side of the test below
    with start(args, launcher="torchrun", script=SEGMENT) as killed:  # leaving the block kills it
        killed.wait_for_file(run_dir / "checkpoints" / "150" / "manifest.json")
        killed.wait_for_step(run_dir, 155)  # past its checkpoint: steps the resumed launch takes again
    launch([*args, "--resume", "auto"], launcher="torchrun", script=SEGMENT)
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"]) == (2, "ddp") and run["resumed_from"].endswith("checkpoints/150")
    assert any(key.startswith("IoU/") for key in read_metrics(run_dir, "eval")[-1])  # per-class results
    return run_dir


def test_trains_resumes_as_if_never_stopped_and_beats_the_untrained_model(shapes_run):
    """Up to its kill the first launch is an uninterrupted run of the same arguments: the resumed
    launch takes the steps it took after checkpoint 150 again, to the bit (the same weights,
    optimizer state, learning rate, batches and augmentations; one world size and batch, so the
    decoder's BatchNorm sees the same batches), then trains on well past the untrained model."""
    losses = train_losses(shapes_run)
    replayed = {step: twice for step, twice in losses.items() if len(twice) == 2}
    assert sorted(replayed)[:5] == [151, 152, 153, 154, 155], sorted(replayed)
    assert all(killed == resumed for killed, resumed in replayed.values()), replayed
    rows = read_metrics(shapes_run, "eval")
    untrained = [r for r in rows if r["step"] == 0][0]
    final = rows[-1]
    assert final["images"] == untrained["images"] == 50  # every val image once over 2 ranks
    assert final["mIoU"] >= untrained["mIoU"] + 30, (untrained["mIoU"], final["mIoU"])
    assert final["mIoU"] >= 60, final
    assert sorted(losses) == list(range(1, final["step"] + 1))  # every step logged, by one launch or both
    assert (shapes_run / "final" / "model.safetensors").is_file()


def test_two_rank_evaluation_equals_one_process(shapes_run, tmp_path):
    """The run's last evaluation (2 ranks, eval batch 3) equals one process evaluating the weights
    it exported: both form the same batches (accelerate shards whole batches), and the last one is
    padded on 2 ranks; per-image confusion matrices must add up identically."""
    weights = str(shapes_run / "final" / "model.safetensors")
    common = [*SHAPES, "--eval-only", "--weights", weights, "--data.eval_micro_batch_size", "3"]
    launch([*common, "--output-dir", str(tmp_path)], launcher="python", script=SEGMENT)
    two, one = read_metrics(shapes_run, "eval")[-1], read_metrics(tmp_path, "eval")[-1]
    assert two["images"] == one["images"] == 50
    for key in ("mIoU", "pixel_acc", "mean_acc", "IoU/background", "IoU/square", "IoU/circle", "IoU/triangle"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


TRANSFORMERS_ALONE = """
import json, sys
import numpy as np, torch
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

folder, pixels = sys.argv[1:]
model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.from_numpy(np.load(pixels))).logits
size = AutoImageProcessor.from_pretrained(folder).size
print(json.dumps({"logits": logits.tolist(), "names": model.config.id2label, "size": [size.height, size.width]}))
"""


def test_transformers_loads_final_alone_with_the_class_names(shapes_run, tmp_path):
    """The demo's SegFormer final/ is transformers' own folder: loaded without shardvision, it
    names the classes, its processor has the run's size, and it gives shardvision's logits."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    final = shapes_run / "final"
    task = SegmentationTask(parse_args(SegmentationConfig, ["--config", str(final / "config.yaml")]))
    model = task.build_model().eval()
    model.load_state_dict(load_file(final / "model.safetensors"))
    evaluation = task.build_datasets()[1]
    pixels = torch.stack([evaluation[i]["image"] for i in range(2)])
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    loaded = without_shardvision(TRANSFORMERS_ALONE, str(final), str(tmp_path / "pixels.npy"), cwd=tmp_path)
    assert loaded["names"] == {"0": "background", "1": "square", "2": "circle", "3": "triangle"}
    assert loaded["size"] == [task.cfg.data.image_size] * 2
    np.testing.assert_allclose(np.array(loaded["logits"]), expected.numpy(), rtol=1e-4, atol=1e-5)


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
        # a mechanism check: 3 steps, a checkpoint mid-epoch, a kill, 3 more steps resumed, then
        # one evaluation (of 8 images: what is proven is that it runs under ZeRO-3 in bf16)
        "--data.shapes_count",
        "[64, 8]",
        "--loop.max_steps",
        "6",
        "--checkpoint.every_steps",
        "3",
        "--loop.eval_every_epochs",
        "0",
        "--checkpoint.at_epoch_end",
        "false",
        "--loop.precision",
        "bf16",
        # torchvision's DeepLabV3 with its auxiliary head, BatchNorm buffers cast to bf16 with the weights
        "--model.source",
        "torchvision",
        "--model.name",
        "deeplabv3_mobilenet_v3_large",
    ]
    run_killed_after_checkpoint(args, tmp_path, step=3, **kwargs)
    assert (tmp_path / "checkpoints" / "3" / "pytorch_model").is_dir()
    launch([*args, "--resume", "auto"], **kwargs)
    run = last_launch(tmp_path)
    assert (run["strategy"], run["zero_stage"], run["precision"]) == ("deepspeed", 3, "bf16")
    assert run["resumed_from"].endswith("checkpoints/3")
    total = run["total_steps"]
    assert (total, run["steps_per_epoch"]) == (6, 4)  # the checkpoint at step 3 is mid-epoch
    evaluation = read_metrics(tmp_path, "eval")[-1]
    assert (evaluation["step"], evaluation["images"]) == (total, 8)
    model = args[args.index("--model.source") :]
    assert_export_is_whole(
        tmp_path / "final" / "model.safetensors", SegmentationConfig, SegmentationTask, SHAPES + model
    )
    assert_torchvision_loads_final_with_the_code_the_docs_print(tmp_path / "final", tmp_path)


def assert_torchvision_loads_final_with_the_code_the_docs_print(final: Path, tmp_path: Path) -> None:
    """docs/segmentation.md's loading code, run without shardvision on `final`: the class names,
    and the logits of shardvision's model and evaluation transform on the same image file."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from recipes.segmentation.data import EvalTransform

    task = SegmentationTask(parse_args(SegmentationConfig, ["--config", str(final / "config.yaml")]))
    raw_val = task.build_datasets()[1].base
    image_file = tmp_path / "image.png"
    raw_val[0][0].save(image_file)
    dump = "\nprint(json.dumps({'logits': logits.tolist(), 'labels': spec['labels']}))"
    snippet = docs_snippet("segmentation.md", "torchvision segmenter") + dump
    loaded = without_shardvision(snippet, str(final), str(image_file), cwd=tmp_path)
    assert loaded["labels"] == ["background", "square", "circle", "triangle"]
    model = task.build_model().eval()
    model.load_state_dict(load_file(final / "model.safetensors"))
    pixels = EvalTransform(task.cfg.data)((Image.open(image_file).convert("RGB"), np.zeros((1, 1))))["image"]
    with torch.no_grad():
        expected = model(pixels[None])["out"]
    np.testing.assert_allclose(np.array(loaded["logits"]), expected.numpy(), rtol=1e-4, atol=1e-4)
