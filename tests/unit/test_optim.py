"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch

from core.config import OptimConfig, ScheduleConfig
from core.errors import ConfigError
from core.optim import build_optimizer, build_scheduler, set_schedule_step


def test_no_weight_decay_on_norms_and_biases():
    model = timm.create_model("test_vit", num_classes=10)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expect_no_decay = p.ndim <= 1 or name.endswith(".bias") or name in {"pos_embed", "cls_token"}
        assert (decay_of[id(p)] == 0.0) == expect_no_decay, name
    assert type(opt).__name__ == "AdamW"


def test_fastest_step_kernel_wherever_the_optimizer_has_one():
    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, OptimConfig(name="adamw")).defaults["fused"] is True  # torch leaves it off
    unfused = build_optimizer(model, OptimConfig(name="adamw", fused=False)).defaults
    assert not unfused["fused"] and unfused["foreach"] is True
    assert not build_optimizer(model, OptimConfig(name="sgd", foreach=True)).defaults[
        "fused"
    ]  # foreach asked for: not fused
    assert build_optimizer(model, OptimConfig(name="lamb")).defaults["foreach"] is True  # no fused kernel: foreach
    assert build_optimizer(model, OptimConfig(name="sgd", fused=False, foreach=False)).defaults["foreach"] is False
    assert not {"fused", "foreach"} & set(
        build_optimizer(model, OptimConfig(name="adafactor")).defaults
    )  # has neither: not passed


def test_fsdp2_parameters_take_only_the_fused_kernels_dtensor_runs():
    """The kernel chosen must run on DTensor shards: fused AdamW does, fused SGD has no sharding
    strategy (found by an FSDP2 SGD fine-tune in tests/integration/test_sharded_start.py)."""
    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, OptimConfig(name="adamw"), sharded=True).defaults["fused"] is True
    sgd = build_optimizer(model, OptimConfig(name="sgd"), sharded=True).defaults
    assert not sgd["fused"] and sgd["foreach"] is True
    with pytest.raises(ConfigError, match="optim.fused: true: the fused sgd kernel cannot run on FSDP2"):
        build_optimizer(model, OptimConfig(name="sgd", fused=True), sharded=True)


def test_fused_and_per_tensor_steps_agree():
    """The fused kernel is the same AdamW update: a few steps on the same gradients end at the
    same weights as torch's reference per-tensor loop."""
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)) for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        build_optimizer(models[0], OptimConfig(name="adamw")),
        build_optimizer(models[1], OptimConfig(name="adamw", fused=False, foreach=False)),
    ]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["foreach"]
    for _ in range(5):
        x = torch.randn(4, 8)
        for model, optimizer in zip(models, optimizers, strict=True):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="lamb", fused=True), r"optim\.fused.*'lamb' has no fused kernel"),
        (dict(name="adamw", fused=True, foreach=True), r"optim\.foreach.*contradicts optim\.fused"),
    ],
)
def test_impossible_kernel_choices_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**overrides).validate()


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


# The families the recipes fine-tune, each with norms, biases and (for ViTs) tokens that must not decay.
DECAY_MODELS = {
    "timm ViT": lambda: timm.create_model("test_vit", num_classes=10),
    "timm ConvNeXt": lambda: timm.create_model("test_convnext", num_classes=10),
    "timm ResNet": lambda: timm.create_model("resnet10t", num_classes=10),
    "transformers ViT": lambda: _hf_vit(),
}


def _hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
    return ViTForImageClassification(config)


def decay_split(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Each parameter's name -> (its group's weight decay, its group's lr)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group: what DeepSpeed's zero.Init and FSDP2's mesh need in-process."""
    import torch.distributed as dist

    from tests.helpers import free_port

    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


# Layer decay needs timm's group_matcher: the shipped configs use it with timm ViTs.
@pytest.mark.parametrize(
    "family, layer_decay", [*((family, None) for family in DECAY_MODELS), ("timm ViT", 0.7)], ids=str
)
def test_decay_split_by_name_is_the_same_whatever_built_the_model(family, layer_decay, one_rank_group):
    """A model built partitioned under ZeRO-3 (every local tensor empty, shape (0,)) and one
    sharded by FSDP2 get the groups the whole model gets, parameter by parameter. (ZeRO-1/2 and
    ZeRO-3 from scratch build the model whole, as DDP does.)"""
    import deepspeed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    torch.manual_seed(0)
    whole = DECAY_MODELS[family]()
    expected = decay_split(build_optimizer(whole, cfg), whole)
    assert {wd for wd, _ in expected.values()} == {0.0, 0.05}, "the reference has both groups"

    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        partitioned = DECAY_MODELS[family]()
    assert all(p.numel() == 0 for p in partitioned.parameters()), "zero.Init left a parameter whole"
    assert decay_split(build_optimizer(partitioned, cfg), partitioned) == expected

    sharded = DECAY_MODELS[family]()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    assert decay_split(build_optimizer(sharded, cfg), sharded) == expected


def test_the_run_summary_counts_a_partitioned_models_groups(one_rank_group):
    import deepspeed

    from core.optim import param_group_facts

    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        model = timm.create_model("test_vit", num_classes=10)
    groups = param_group_facts(build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.05)))
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    assert sum(g["values"] for g in groups) == sum(p.ds_numel for p in model.parameters())
    assert sum(g["tensors"] for g in groups) == len(list(model.parameters())) and all(g["values"] for g in groups)
