"""The detection recipe end to end: 2 gloo ranks on the synthetic shapes (real JPEG files and a
COCO json through the real loader), killed and resumed as if never stopped, against an untrained
baseline; the written predictions re-scored by pycocotools; 2-rank evaluation against 1 process;
ZeRO-3 in bf16; Mask R-CNN's mask mAP under ZeRO-2; a transformers detector (D-FINE) learning, its final/
loaded by transformers alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.config_parsing import parse_args
from recipes.detection.task import DetectionConfig, DetectionTask
from tests.builders import pycocotools_direct
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

DETECT = "recipes/detection/train.py"
SHAPES = [
    "--config",
    "recipes/detection/configs/shapes.yaml",
    "--logging.progress_bar",
    "false",
    "--logging.trackers",
    "[]",
    # the demo's 256 px costs half as much again per step; these tests need learning, not its AP50
    "--data.min_size",
    "128",
    "--data.max_size",
    "128",
]
VAL_JSON = Path.home() / ".cache" / "shardvision" / "shapes-det-v2-240-60" / "annotations" / "instances_val.json"


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """8 epochs of the demo, killed 5 steps after a mid-epoch checkpoint, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("shapes_det")
    args = [
        *SHAPES,
        "--output-dir",
        str(run_dir),
        "--loop.epochs",
        "8",
        "--loop.eval_at_start",
        "true",
        "--checkpoint.every_steps",
        "50",
        # a metric run: evaluated untrained and at the end only, checkpointed for the kill only
        "--loop.eval_every_epochs",
        "0",
        "--checkpoint.at_epoch_end",
        "false",
        "--logging.every_steps",
        "1",
        # its last evaluation is test_two_rank_evaluation_equals_one_process's 2-rank side
        "--data.eval_micro_batch_size",
        "7",
    ]
    with start(args, launcher="torchrun", script=DETECT) as killed:  # leaving the block kills it
        killed.wait_for_file(run_dir / "checkpoints" / "50" / "manifest.json")
        killed.wait_for_step(run_dir, 55)  # past its checkpoint: steps the resumed launch takes again
    launch([*args, "--resume", "auto"], launcher="torchrun", script=DETECT)
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"]) == (2, "ddp") and run["resumed_from"].endswith("checkpoints/50")
    return run_dir


def test_trains_resumes_as_if_never_stopped_and_beats_the_untrained_model(shapes_run):
    """Up to its kill the first launch is an uninterrupted run of the same arguments: the resumed
    launch takes the steps it took after checkpoint 50 again, to the bit (the same weights, optimizer
    state, learning rate, batches and random draws: augmentations, sampled anchors and RoIs; one
    world size and batch, so BatchNorm sees the same batches), then trains on well past the
    untrained model."""
    replayed = {step: losses for step, losses in train_losses(shapes_run).items() if len(losses) == 2}
    assert sorted(replayed)[:5] == [51, 52, 53, 54, 55], sorted(replayed)
    assert all(killed == resumed for killed, resumed in replayed.values()), replayed
    rows = read_metrics(shapes_run, "eval")
    untrained, final = rows[0], rows[-1]
    assert untrained["step"] == 0 and final["step"] == 120
    assert untrained["images"] == final["images"] == 60  # every val image exactly once over 2 ranks
    assert final["AP50"] >= 0.15 and final["AP50"] >= untrained["AP50"] + 0.1, (untrained, final)
    assert (shapes_run / "final" / "model.safetensors").is_file()


def test_written_predictions_rescore_to_the_reported_metrics(shapes_run):
    folder = shapes_run / "eval" / "step-120"
    reported = json.load(open(folder / "metrics.json"))
    direct = pycocotools_direct(VAL_JSON, folder / "predictions.json")
    assert [reported[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(list(direct[:6]))
    assert {p["image_id"] for p in json.load(open(folder / "predictions.json"))} <= set(range(1, 61))


def test_two_rank_evaluation_equals_one_process(shapes_run, tmp_path):
    """The run's last evaluation, on 2 ranks with eval batch 7 (the 60 images in 9 batches, each as
    one process forms it; the ranks' uneven share padded), equals one process evaluating the
    weights it exported."""
    weights = str(shapes_run / "final" / "model.safetensors")
    common = [*SHAPES, "--eval-only", "--weights", weights, "--data.eval_micro_batch_size", "7"]
    launch([*common, "--output-dir", str(tmp_path)], launcher="python", script=DETECT)
    two, one = read_metrics(shapes_run, "eval")[-1], read_metrics(tmp_path, "eval")[-1]
    assert two["images"] == one["images"] == 60
    for key in ("AP", "AP50", "AP75"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    p2 = json.load(open(shapes_run / "eval" / "step-120" / "predictions.json"))
    p1 = json.load(open(tmp_path / "eval" / "step-0" / "predictions.json"))
    assert len(p2) == len(p1)


def test_zero3_in_bf16_trains_checkpoints_resumes_and_exports(tmp_path):
    """ZeRO-3 partitions the detector's parameters, held in bf16: its NMS has no bf16 CPU kernel,
    so this also runs the steps under autocast (DetectionTask.autocast_half_weights). ZeRO-2 ran
    here until it was replaced: ZeRO-3 takes the same path and partitions the weights as well."""
    kwargs = dict(
        launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs/deepspeed_zero3.yaml"), script=DETECT
    )
    # A mechanism check: 2 steps, a checkpoint mid-epoch, a kill, 2 more steps resumed (each launch's
    # start costs more than its steps), then one evaluation, of 8 images: that it runs and writes
    # its predictions under ZeRO-3 in bf16 is what is proven.
    args = [*SHAPES, "--output-dir", str(tmp_path), "--loop.max_steps", "4", "--checkpoint.every_steps", "2"]
    args += ["--loop.precision", "bf16", "--data.shapes_count", "[48, 8]"]
    args += ["--loop.eval_every_epochs", "0", "--checkpoint.at_epoch_end", "false"]
    run_killed_after_checkpoint(args, tmp_path, step=2, **kwargs)
    assert (tmp_path / "checkpoints" / "2" / "pytorch_model").is_dir()
    launch([*args, "--resume", "auto"], **kwargs)
    run = last_launch(tmp_path)
    assert (run["strategy"], run["zero_stage"], run["precision"]) == ("deepspeed", 3, "bf16")
    assert run["resumed_from"].endswith("checkpoints/2")
    total = run["total_steps"]
    assert (total, run["steps_per_epoch"]) == (4, 3)  # the checkpoint at step 2 is mid-epoch
    evaluation = read_metrics(tmp_path, "eval")[-1]
    assert (evaluation["step"], evaluation["images"]) == (total, 8)
    assert (tmp_path / "eval" / f"step-{total}" / "predictions.json").is_file()
    assert_export_is_whole(tmp_path / "final" / "model.safetensors", DetectionConfig, DetectionTask, SHAPES)


INSTANCES = [
    *SHAPES[:1],
    "recipes/detection/configs/shapes_instances.yaml",
    *SHAPES[2:],
    "--data.shapes_count",
    "[48, 15]",
]


def test_mask_rcnn_under_zero2_scores_masks_as_pycocotools_does_and_evaluates_alike_on_one_process(tmp_path):
    """Mask R-CNN, 2 ranks under ZeRO-2: its box and mask mAP equal pycocotools run on the
    predictions it wrote (masks as RLE, every image once across ranks), and its exported weights
    evaluated by one process give the same figures."""
    # Evaluation one image at a time: every image's forward is then the same computation on either
    # side (an untrained model's near-equal scores make batched convolutions' rounding visible).
    args = [
        *INSTANCES,
        "--loop.max_steps",
        "3",
        "--checkpoint.at_epoch_end",
        "false",
        "--data.eval_micro_batch_size",
        "1",
    ]
    launch(
        [*args, "--output-dir", str(tmp_path / "two")],
        launcher="accelerate",
        accelerate_config=str(REPO / "accelerate_configs/deepspeed_zero2.yaml"),
        script=DETECT,
    )
    run = last_launch(tmp_path / "two")
    assert (run["strategy"], run["zero_stage"]) == ("deepspeed", 2)
    two = read_metrics(tmp_path / "two", "eval")[-1]
    assert two["images"] == 15
    val_json = next(Path.home().glob(".cache/shardvision/shapes-det-v2-48-15")) / "annotations" / "instances_val.json"
    written = tmp_path / "two" / "eval" / "step-3" / "predictions.json"
    predictions = json.load(open(written))
    assert predictions and all("segmentation" in p for p in predictions)
    assert {p["image_id"] for p in predictions} <= set(range(1, 16))
    box, mask = pycocotools_direct(val_json, written), pycocotools_direct(val_json, written, "segm")
    assert [two[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(box[:3]), abs=1e-9)
    assert [two[f"mask_{k}"] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(mask[:3]), abs=1e-9)

    assert_one_process_evaluates_the_export_alike(args, tmp_path, two, ("AP", "AP50", "mask_AP", "mask_AP50"))


def test_transformers_detector_learns_and_evaluates_alike_on_two_ranks_and_one(tmp_path):
    """D-FINE (a tiny local config, random init; of the transformers detectors here the quickest
    to learn the shapes) on 2 ranks: its own loss trains it well past the untrained model's AP50,
    and one process evaluating its exported weights (its heads tied to its decoder's, written once)
    gets the 2-rank evaluation's figures (one image per forward on both sides, as in the Mask R-CNN
    test)."""
    args = [
        *SHAPES,
        "--model.source",
        "transformers",
        "--model.name",
        "recipes/detection/configs/d_fine_tiny",
        "--model.kwargs",
        "{}",
        # its AP50 after 4 of 6 epochs was 0.14, from 0.0006 untrained
        "--loop.epochs",
        "4",
        "--loop.eval_at_start",
        "true",
        "--loop.eval_every_epochs",
        "0",
        "--checkpoint.at_epoch_end",
        "false",
        "--data.eval_micro_batch_size",
        "1",
    ]
    launch([*args, "--output-dir", str(tmp_path / "two")], launcher="torchrun", script=DETECT)
    untrained, trained = read_metrics(tmp_path / "two", "eval")
    assert untrained["step"] == 0 and trained["images"] == 60
    assert trained["AP50"] >= untrained["AP50"] + 0.05, (untrained, trained)
    assert_one_process_evaluates_the_export_alike(args, tmp_path, trained, ("AP", "AP50", "AP75"))
    assert_transformers_loads_final_alone(tmp_path / "two", tmp_path)


# What a user of transformers alone writes to load a detector's folder and run it on pixels.
TRANSFORMERS_ALONE = """
import json, sys
import numpy as np, torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection

folder, pixels = sys.argv[1:]
model = AutoModelForObjectDetection.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.from_numpy(np.load(pixels))).logits
processor = AutoImageProcessor.from_pretrained(folder)
print(json.dumps({"logits": logits.tolist(), "names": model.config.id2label, "size": dict(processor.size)}))
"""


def test_torchvision_loads_final_with_the_code_the_docs_print(shapes_run, tmp_path):
    """docs/detection.md's loading code, run without shardvision on the demo run's final/: the
    same detections as shardvision's model with those weights, labelled with the data's names."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    dump = "\nfound = {k: detections[k].tolist() for k in ('boxes', 'scores', 'labels')}"
    dump += "\nprint(json.dumps(spec | {'predicted': found.pop('labels')} | found))"
    image = VAL_JSON.parent.parent / "val" / json.loads(VAL_JSON.read_text())["images"][0]["file_name"]
    snippet = docs_snippet("detection.md", "torchvision detector") + dump
    loaded = without_shardvision(snippet, str(shapes_run / "final"), str(image), cwd=tmp_path)
    assert loaded["name"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert loaded["labels"] == ["__background__", "square", "circle", "triangle"]
    task = DetectionTask(parse_args(DetectionConfig, ["--config", str(shapes_run / "final" / "config.yaml")]))
    model = task.build_model().eval()
    model.load_state_dict(load_file(shapes_run / "final" / "model.safetensors"))
    with torch.no_grad():
        expected = model([to_tensor(Image.open(image).convert("RGB"))])[0]
    for key in ("boxes", "scores"):
        np.testing.assert_allclose(np.array(loaded[key]), expected[key].numpy(), rtol=1e-4, atol=1e-4)
    assert loaded["predicted"] == expected["labels"].tolist()


def assert_transformers_loads_final_alone(run_dir: Path, tmp_path: Path) -> None:
    """final/ is transformers' own model folder: loaded by transformers alone (a separate process
    that imports no shardvision module), it names the data's categories, resizes as the run
    evaluated, and gives the logits shardvision's model gives on the same pixels."""
    task = DetectionTask(parse_args(DetectionConfig, ["--config", str(run_dir / "final" / "config.yaml")]))
    model = task.build_model().eval()
    model.load_state_dict(load_file(run_dir / "final" / "model.safetensors"))
    _, evaluation = task.build_datasets()
    pixels = task.hf.inputs([evaluation[i]["image"] for i in range(2)], resize=True)["pixel_values"]
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    loaded = without_shardvision(TRANSFORMERS_ALONE, str(run_dir / "final"), str(tmp_path / "pixels.npy"), cwd=tmp_path)
    assert loaded["names"] == {"0": "square", "1": "circle", "2": "triangle"}
    assert loaded["size"] == {"shortest_edge": 128, "longest_edge": 128}
    np.testing.assert_allclose(np.array(loaded["logits"]), expected.numpy(), rtol=1e-4, atol=1e-5)


def assert_one_process_evaluates_the_export_alike(args: list[str], tmp_path: Path, two: dict, keys: tuple) -> None:
    """One process evaluating the export of the 2-rank run in `tmp_path/two` gets its last
    evaluation's `keys`."""
    weights = str(tmp_path / "two" / "final" / "model.safetensors")
    launch(
        [*args, "--eval-only", "--weights", weights, "--output-dir", str(tmp_path / "one")],
        launcher="python",
        script=DETECT,
    )
    one = read_metrics(tmp_path / "one", "eval")[-1]
    for key in keys:
        assert one[key] == pytest.approx(two[key], abs=1e-6), key
