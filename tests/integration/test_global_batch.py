"""The global batch, whatever its layout: 1 process with accumulation and 2 ranks take the same
optimizer steps at the same learning rates, and accumulated micro-batches give the update of one
larger batch, under DDP and ZeRO-2 (real launches of the classification recipe, 2 gloo ranks)."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from tests.helpers import (
    TINY_VIT,
    TRAJECTORY,
    accelerate_config,
    last_launch,
    launch,
    read_metrics,
)


def test_lr_per_optimizer_step_ignores_ranks_and_accumulation(ddp_reference, tmp_path):
    """1 process x 32 x 4 accumulation against the reference's 2 ranks x 64: the same global
    batch of 128, hence the same optimizer steps and the same lr at each of them. The schedule
    does not depend on the model."""
    batches = ["--data.micro_batch_size", "32", "--loop.grad_accum_steps", "4"]
    launch([*TRAJECTORY, "--logging.count_flops", "false", *batches, "--output-dir", str(tmp_path)], launcher="python")
    run = last_launch(tmp_path)
    assert (run["world_size"], run["global_batch"], run["total_steps"]) == (1, 128, 22), run
    lr = {row["step"]: row["lr"] for row in read_metrics(tmp_path, "train")}
    reference = {row["step"]: row["lr"] for row in read_metrics(ddp_reference, "train")}
    assert lr == reference and len(lr) == 22
    # digits.yaml: peak 2e-3, warmup 1 epoch = 11 steps from 0.01x, then cosine to 0 over 11 steps.
    # The logged lr is the one the next step will use, i.e. the schedule at `step`.
    for step, value in lr.items():
        if step < 11:
            expected = 2e-3 * (0.01 + 0.99 * step / 11)
        else:
            expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step - 11) / 11))
        assert value == pytest.approx(expected, abs=1e-12), step


# One SGD step of the tiny ViT: a LayerNorm ViT, so no statistic depends on the micro-batch size;
# SGD, whose update is linear in the gradient (Adam's first step is lr * sign(g), which turns
# rounding noise in near-zero gradients into full-size differences).
ONE_SGD_STEP = [
    *TINY_VIT,
    "--optim.name",
    "sgd",
    "--optim.lr",
    "0.1",
    "--loop.max_steps",
    "1",
    "--schedule.name",
    "constant",
    "--schedule.warmup_steps",
    "0",
    "--logging.count_flops",
    "false",
]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_accumulation_equals_one_larger_batch(uninterrupted, tmp_path, strategy):
    """4 micro-batches of 8 per rank give the update of one batch of 32 per rank: the one-batch
    update is DDP's (2 ranks x 32, launched once for both cases); ZeRO-2's accumulated update is held
    to it as DDP's is, to float noise (1e-4 of the update: a micro-batch lost or counted twice moves it
    by far more)."""
    kwargs = (
        dict(launcher="torchrun")
        if strategy == "ddp"
        else dict(launcher="accelerate", accelerate_config=accelerate_config("deepspeed_zero2.yaml"))
    )
    layout = {"ddp": "ddp", "zero2": "deepspeed"}
    accumulated = tmp_path / "accumulated"
    batches = ["--data.micro_batch_size", "8", "--loop.grad_accum_steps", "4"]
    launch([*ONE_SGD_STEP, *batches, "--output-dir", str(accumulated)], **kwargs)
    large = uninterrupted([*ONE_SGD_STEP, "--data.micro_batch_size", "32"], launcher="torchrun")
    run, one_batch = last_launch(accumulated), last_launch(large)
    assert (run["strategy"], run["world_size"], run["global_batch"]) == (layout[strategy], 2, 64), run
    assert (one_batch["strategy"], one_batch["world_size"], one_batch["global_batch"]) == ("ddp", 2, 64), one_batch
    a = load_file(accumulated / "final" / "model.safetensors")
    b = load_file(large / "final" / "model.safetensors")

    import timm

    from core.distributed import seed_everything

    seed_everything(0)  # the trainer's initial weights
    init = timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()
    assert a.keys() == b.keys() == init.keys()
    for k in a:
        update_a, update_b = a[k] - init[k], b[k] - init[k]
        assert update_a.norm() > 0, f"{k}: no optimizer step happened"
        assert (update_a - update_b).norm() <= 1e-4 * update_a.norm(), k
