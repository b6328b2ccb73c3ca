"""LoRA through peft on each family's default layers: what is adapted, what trains, what the
optimizer holds, what the export merges; and the errors that name a key."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

from core.checkpoint.export import save_whole_weights
from core.config import TrainConfig
from core.config_parsing import parse_args
from core.errors import ConfigError, WeightsError
from core.lora import ADAPTER_CONFIG, apply_lora, export_lora
from core.optim import build_optimizer
from recipes.classification.task import ClassificationConfig


def tiny_hf_vit() -> torch.nn.Module:
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    config.num_labels = 3
    return ViTForImageClassification(config)


FAMILIES = {
    "timm ViT": (
        lambda: timm.create_model("test_vit", img_size=32, num_classes=3),
        ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        "head",
    ),
    "timm ConvNeXt": (
        lambda: timm.create_model("convnext_atto", num_classes=3),
        ("mlp.fc1", "mlp.fc2"),
        "head.fc",
    ),
    "transformers ViT": (
        tiny_hf_vit,
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
        "classifier",
    ),
}


def lora_config(rank: int = 4, **model) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.lora_rank = rank
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_adapts_its_default_layers_and_trains_the_head_fully(family):
    build, adapted, head = FAMILIES[family]
    model = build()
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    expected = {n for n in layers if n.endswith(adapted) and not n.startswith(head)}
    assert expected
    apply_lora(model, lora_config().model, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert lora == expected
    assert {n for n in trainable if ".lora_" not in n} == {
        n for n, _ in model.get_submodule(head).named_parameters(head)
    }
    # timm's grouping leaves the frozen weights out: the optimizer holds state for what trains only.
    optimizer = build_optimizer(model, TrainConfig().optim)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_the_adapters_start_from_the_seed_alone():
    first, second = (timm.create_model("test_vit", img_size=32, num_classes=3) for _ in range(2))
    torch.manual_seed(5)  # whatever the random stream held before
    apply_lora(first, lora_config().model, seed=0)
    apply_lora(second, lora_config().model, seed=0)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".lora_A" in k)


def test_the_export_merges_for_timm_and_writes_the_adapter_peft_loads(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("test_vit", img_size=32, num_classes=3)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    cfg = lora_config(weights=str(tmp_path / "base.safetensors"))
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    model.load_state_dict(base.state_dict())
    apply_lora(model, cfg.model, seed=0)
    with torch.no_grad():  # trained adapters: B is zero at the start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))

    def build():
        return timm.create_model("test_vit", img_size=32, num_classes=3)

    export_lora(model.state_dict(), build, cfg.model, str(tmp_path), save_whole_weights)
    merged = build()
    merged.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    adapted = PeftModel.from_pretrained(base, str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    for m in (model, merged, adapted):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapted(x), model(x), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["modules_to_save"] == ["head"]

    # A checkpoint holds what trains only: the frozen rest comes from the base file, else it is named.
    trained = {k: v for k, v in model.state_dict().items() if ".lora_" in k or k.startswith("head.")}
    (tmp_path / "again").mkdir()
    export_lora(trained, build, cfg.model, str(tmp_path / "again"), save_whole_weights, base=cfg.model.weights)
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in load_file(tmp_path / "model.safetensors").items())
    with pytest.raises(WeightsError, match="no base weights file: no cls_token, a frozen weight of the LoRA run"):
        export_lora(trained, build, cfg.model, str(tmp_path / "none"), save_whole_weights)


def test_a_family_without_defaults_names_the_model_and_takes_explicit_targets():
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ConfigError, match=r"model.lora_targets: no default for resnet18 \(ResNet\)"):
        apply_lora(model, lora_config(name="resnet18").model, seed=0)
    apply_lora(model, lora_config(name="resnet18", lora_targets=[r"layer4\.\d\.conv2"]).model, seed=0)
    assert {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n} == {
        "layer4.0.conv2",
        "layer4.1.conv2",
    }
    with pytest.raises(ConfigError, match="model.lora_targets"):
        apply_lora(timm.create_model("resnet18"), lora_config(lora_targets=["nothing_here"]).model, seed=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model.lora_rank", "4"], "model.lora_rank: LoRA adapts pretrained weights; give them with model.weights"),
        (["--model.lora_rank", "-1"], r"model.lora_rank must be >= 0 \(0: off\), got -1"),
        (["--model.lora_targets", "['blocks.(']"], r"model.lora_targets: 'blocks.\(' is not a regular expression"),
    ],
)
def test_lora_settings_are_checked_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(ClassificationConfig, ["--config", "recipes/classification/configs/digits.yaml", *argv])


def test_lora_with_a_weight_average_is_refused(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    argv = ["--config", "recipes/classification/configs/digits.yaml", "--model.lora_rank", "4"]
    argv += ["--model.weights", str(tmp_path / "w.safetensors"), "--loop.ema_decay", "0.9"]
    with pytest.raises(ConfigError, match="loop.ema_decay with model.lora_rank"):
        parse_args(ClassificationConfig, argv)


def test_a_model_without_a_known_classifier_names_the_key():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="model.lora_modules_to_save: no classifier found"):
        apply_lora(model, lora_config(lora_targets=["0"]).model, seed=0)
    apply_lora(model, lora_config(lora_targets=["0"], lora_modules_to_save=["2"]).model, seed=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A.default.weight",
        "0.lora_B.default.weight",
        "2.weight",
        "2.bias",
    }


def test_a_lora_checkpoint_resumes_only_on_its_base_file_and_adapter_settings():
    from core.checkpoint.resume import _check_same_lora
    from core.errors import CheckpointError

    saved = {"path": "/old/base.safetensors", "sha256": "ab", "rank": 4, "alpha": None, "targets": []}
    _check_same_lora("ckpt", saved, {**saved, "path": "/moved/base.safetensors"})  # the same file, moved
    with pytest.raises(CheckpointError, match=r"whose sha256 'ab' \(this run: 'cd'\) differ"):
        _check_same_lora("ckpt", saved, {**saved, "sha256": "cd"})
    with pytest.raises(CheckpointError, match=r"whose alpha None \(this run: 8\) differ"):
        _check_same_lora("ckpt", saved, {**saved, "alpha": 8})
    with pytest.raises(CheckpointError, match="ckpt is a full fine-tune's checkpoint, not a LoRA run's"):
        _check_same_lora("ckpt", None, saved)
    with pytest.raises(CheckpointError, match="ckpt is a LoRA run's checkpoint"):
        _check_same_lora("ckpt", saved, None)
