"""Fine-tuning under ZeRO-3 or FSDP2 starts sharded: the model is built partitioned (DeepSpeed's
zero.Init; FSDP2: its parameters on the meta device, then sharded by accelerate's prepare) and the
weights file is streamed into its partitions, so no rank holds the whole model. Real 2-rank gloo
launches with the repo's ZeRO-3 and FSDP2 configs, held to DDP and to the file itself."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config_parsing import parse_args
from tests.helpers import HF_VIT, HF_VIT_3_STEPS, QUICK, REPO, TINY_VIT, ZERO3_LAUNCH, last_launch, launch, read_metrics

FSDP = dict(launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs" / "fsdp.yaml"))
SHARDED = {"zero3": ZERO3_LAUNCH, "fsdp": FSDP}
STARTED_SHARDED = {
    "zero3": "ZeRO-3: model built partitioned (DeepSpeed zero.Init), {} streamed into it",
    "fsdp": "FSDP2: model built on the meta device, sharded, {} streamed in",
}
# A small ViT from each model source, and the prefix of its classification head.
MODELS = {"timm": (TINY_VIT, "head."), "transformers": (HF_VIT, "classifier.")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The timm ViT after 3 steps on 2 DDP ranks: its run's last evaluation is DDP evaluating them."""
    folder = tmp_path_factory.mktemp("pretrained")
    launch([*TINY_VIT, "--loop.max_steps", "3", "--output-dir", str(folder)], launcher="torchrun")
    return folder / "final" / "model.safetensors"


@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_start_evaluates_streamed_weights_as_ddp_does(strategy, weights, tmp_path):
    """The weights evaluated by ZeRO-3 or FSDP2, built partitioned and streamed into, give the
    figures of the DDP run that trained them, evaluating them at its end (2 ranks, the same eval
    batches)."""
    args = [*TINY_VIT, "--eval-only", "--weights", str(weights)]
    proc = launch([*args, "--output-dir", str(tmp_path / strategy)], **SHARDED[strategy])
    assert STARTED_SHARDED[strategy].format(weights) in proc.stderr
    ddp_run = weights.parents[1]
    assert (last_launch(ddp_run)["strategy"], last_launch(ddp_run)["world_size"]) == ("ddp", 2)
    got, expected = read_metrics(tmp_path / strategy, "eval")[-1], read_metrics(ddp_run, "eval")[-1]
    assert expected["step"] == 3 and got["samples"] == expected["samples"] == 360
    for metric in ("loss", "top1", "top5"):
        assert got[metric] == pytest.approx(expected[metric], rel=1e-5), metric


# Both model sources under ZeRO-3; FSDP2 takes the same loading path for either, once.
@pytest.mark.parametrize(("strategy", "source"), [("zero3", "timm"), ("zero3", "transformers"), ("fsdp", "timm")])
def test_sharded_fine_tune_loads_everything_but_the_excluded_head(strategy, source, weights, uninterrupted, tmp_path):
    # An lr far below float resolution: the steps run (and checkpoint, export) but move no weight,
    # so the export shows exactly what was loaded.
    model_args, head = MODELS[source]
    if source != "timm":  # 3 steps from scratch under ZeRO-3, where the model is built whole, then partitioned
        weights = uninterrupted(HF_VIT_3_STEPS, **ZERO3_LAUNCH) / "final" / "model.safetensors"
    run = tmp_path / "run"
    args = [*model_args, "--weights", str(weights), "--model.weights_exclude", f"['{head}*']", "--optim.lr", "1e-30"]
    args += ["--loop.max_steps", "2", "--output-dir", str(run)]
    assert STARTED_SHARDED[strategy].format(weights) in launch(args, **SHARDED[strategy]).stderr
    exported, original = load_file(run / "final" / "model.safetensors"), load_file(weights)
    assert exported.keys() == original.keys()
    for name, value in original.items():
        if name.startswith(head):
            assert not torch.equal(exported[name], value), name  # started fresh
        else:
            assert torch.equal(exported[name], value), name
    startup = read_metrics(run, "startup")[-1]["peak_resident_mb_per_rank"]
    assert len(startup) == 2 and all(mb > 0 for mb in startup)

    launch([*args[:-4], "--loop.max_steps", "3", "--output-dir", str(run), "--resume", "auto"], **SHARDED[strategy])
    assert last_launch(run)["resumed_from"] == str(run / "checkpoints" / "2")
    assert json.loads((run / "final" / "metrics.json").read_text())["step"] == 3  # and went on


@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_fine_tune_decays_the_weights_ddp_decays(strategy, weights, uninterrupted, tmp_path):
    """A ZeRO-3 or FSDP2 fine-tune (built partitioned) with weight decay follows the DDP fine-tune
    of the same seed and batches: the same parameter groups, and the same weights after four
    steps. SGD's decay is part of the gradient, so at lr 0.1 and weight decay 0.5 a run without it
    ends about 20 % away, and float noise stays under 1e-5."""
    args = [*TINY_VIT, "--weights", str(weights), "--optim.name", "sgd", "--optim.lr", "0.1"]
    args += ["--optim.weight_decay", "0.5", "--loop.max_steps", "4", "--logging.count_flops", "false"]
    launch([*args, "--output-dir", str(tmp_path / strategy)], **SHARDED[strategy])
    ddp_run = uninterrupted(args, launcher="torchrun")
    sharded, ddp = last_launch(tmp_path / strategy), last_launch(ddp_run)
    assert (sharded["strategy"], ddp["strategy"]) == ({"zero3": "deepspeed", "fsdp": "fsdp"}[strategy], "ddp")
    assert sharded["param_groups"] == ddp["param_groups"]
    assert [g["weight_decay"] for g in ddp["param_groups"]] == [0.0, 0.5]
    got, expected = (load_file(run / "final" / "model.safetensors") for run in (tmp_path / strategy, ddp_run))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_start_refuses_a_file_that_does_not_fit_with_the_ddp_message(strategy, weights, tmp_path):
    state = load_file(weights)
    state["head.weight"] = torch.zeros(3, state["head.weight"].shape[1])
    misfit = tmp_path / "misfit.safetensors"
    save_file(state, misfit)
    args = [*TINY_VIT, "--weights", str(misfit), "--output-dir", str(tmp_path / "run")]
    proc = launch(args, check=False, **SHARDED[strategy])
    assert proc.returncode != 0
    assert (
        f"{misfit} does not fit the model (shape mismatch: head.weight: file (3, 64) vs model (10, 64))" in proc.stderr
    )


# The recipes' torchvision detector and segmenter and a transformers segmenter, each built
# partitioned: (recipe, its config and task classes, arguments beside its shapes.yaml).
TORCHVISION_DEEPLAB = ["--model.source", "torchvision", "--model.name", "deeplabv3_mobilenet_v3_large"]
VISION = {
    "fasterrcnn": ("detection", "DetectionConfig", "DetectionTask", []),
    "deeplabv3": ("segmentation", "SegmentationConfig", "SegmentationTask", TORCHVISION_DEEPLAB),
    "segformer": ("segmentation", "SegmentationConfig", "SegmentationTask", []),
}


@pytest.mark.parametrize("model", VISION)
def test_zero3_builds_the_recipes_detectors_and_segmenters_partitioned(model, tmp_path):
    task_name, config_class, task_class, extra = VISION[model]
    args = ["--config", f"recipes/{task_name}/configs/shapes.yaml", *QUICK, *extra]
    recipe = importlib.import_module(f"recipes.{task_name}.task")
    cfg = parse_args(getattr(recipe, config_class), args)
    torch.manual_seed(1)  # the model's own weights, moved: not what the run's seed would build
    built = getattr(recipe, task_class)(cfg).build_model().state_dict()
    weights = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in built.items()}
    save_file(weights, tmp_path / "weights.safetensors")

    run = tmp_path / "run"
    args += ["--weights", str(tmp_path / "weights.safetensors"), "--optim.lr", "1e-30", "--loop.max_steps", "1"]
    # one step on a data set of its own, evaluated on 2 images: the build and the load are what is proven
    args += ["--data.shapes_count", "[16, 2]", "--logging.count_flops", "false"]
    proc = launch([*args, "--output-dir", str(run)], script=f"recipes/{task_name}/train.py", **ZERO3_LAUNCH)
    assert "ZeRO-3: model built partitioned (DeepSpeed zero.Init)" in proc.stderr
    exported = load_file(run / "final" / "model.safetensors")
    assert exported.keys() == weights.keys()
    for name, value in weights.items():
        if value.is_floating_point() and not name.endswith(("running_mean", "running_var")):  # norm statistics train
            # an lr of 1e-30 still moves a weight that is exactly 0 (a bias) by as much
            torch.testing.assert_close(exported[name], value, rtol=0, atol=1e-20, msg=name)
