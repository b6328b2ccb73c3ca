"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from core.config import OptimConfig, ScheduleConfig
from core.optim import build_optimizer, build_scheduler, set_schedule_step


def test_no_weight_decay_on_norms_and_biases():
    model = timm.create_model("test_vit", num_classes=10)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expect_no_decay = p.ndim <= 1 or name.endswith(".bias") or name in {"pos_embed", "cls_token"}
        assert (decay_of[id(p)] == 0.0) == expect_no_decay, name
    assert type(opt).__name__ == "AdamW"


def test_multi_tensor_kernels_wherever_the_optimizer_has_them():
    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, OptimConfig(name="adamw")).defaults["foreach"] is True  # torch leaves it off on CPU
    assert build_optimizer(model, OptimConfig(name="sgd", foreach=False)).defaults["foreach"] is False
    assert "foreach" not in build_optimizer(model, OptimConfig(name="adafactor")).defaults  # has none: not passed


def test_layer_decay_scales_are_baked_into_the_base_lr():
    model = timm.create_model("test_vit", num_classes=10)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, layer_decay=0.5))
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert len(lrs) > 2 and max(lrs) == pytest.approx(1e-3)
    assert all(math.isclose(g["lr"], 1e-3 * g["lr_scale"]) for g in opt.param_groups)


def reference_lr(step, peak, warmup, total, start, floor):
    """Warmup + cosine written out independently of core.optim."""
    if step < warmup:
        return peak * (start + (1 - start) * step / warmup)
    t = (step - warmup) / (total - warmup)
    return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)


def test_warmup_cosine_matches_reference_at_every_optimizer_step():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.1, min_lr_ratio=0.05)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, total_steps=50)
    for step in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(reference_lr(step, 0.4, 10, 50, 0.1, 0.05)), step
        opt.step()
        sched.step()


def test_step_schedule_and_resume_position():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    cfg = ScheduleConfig(name="step", warmup_steps=0, milestones_epochs=[1, 2], gamma=0.1)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, total_steps=30)
    set_schedule_step(sched, 15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    set_schedule_step(sched, 25)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
