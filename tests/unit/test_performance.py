"""The engine's speed switches (compile, channels_last, activation checkpointing) and its
throughput accounting (FLOPs per sample, TFLOP/s and MFU in the training log)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core.distributed import reset_accelerator_state
from core.errors import ConfigError
from core.model_options import apply_model_options
from core.run_log import peak_tflops, training_flops_per_sample
from core.trainer import Trainer
from tests.builders import TinyTask, tiny_config
from tests.helpers import REPO, run_env


def test_flops_per_sample_match_the_closed_form():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    forward_flops = 2 * (4 * 16 + 16 * 2)  # a multiply and an add per weight
    assert training_flops_per_sample(mlp, lambda: mlp(torch.randn(5, 4)), samples=5) == 3 * forward_flops

    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    conv_flops = 2 * 3 * 8 * 3 * 3 * 16 * 16  # per output pixel: C_in x k x k multiply-adds per output channel
    assert training_flops_per_sample(conv, lambda: conv(torch.randn(2, 3, 16, 16)), samples=2) == 3 * conv_flops
    assert conv.training  # restored after counting in eval mode


def test_peak_is_the_configured_one_or_unknown_on_cpu():
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5


def test_training_log_reports_tflops_and_mfu(fresh_accelerate_state, tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.logging.peak_tflops = 1e-6
    trainer = Trainer(cfg, TinyTask(cfg))
    assert trainer.flops_per_sample == 3 * 2 * (4 * 16 + 16 * 2)
    trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert train
    for row in train:
        assert row["tflops_per_device"] == pytest.approx(row["images_per_sec"] * trainer.flops_per_sample / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 1e-6)


def resnet_and_batch():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    return model, images, labels


def gradients(model, images, labels):
    F.cross_entropy(model(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_grad_checkpointing_recomputes_the_same_gradients(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.grad_checkpointing = True
    plain, images, labels = resnet_and_batch()
    checkpointed, _, _ = resnet_and_batch()
    apply_model_options(checkpointed, cfg)
    assert checkpointed.grad_checkpointing  # timm's flag: stages now run under torch.utils.checkpoint
    expected, got = gradients(plain, images, labels), gradients(checkpointed, images, labels)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grad_checkpointing_on_a_model_without_it_names_the_model(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.name, cfg.model.grad_checkpointing = "my_mlp", True
    with pytest.raises(ConfigError, match=r"model.grad_checkpointing: my_mlp \(Sequential\) cannot recompute"):
        apply_model_options(torch.nn.Sequential(torch.nn.Linear(2, 2)), cfg)


def test_channels_last_changes_the_layout_not_the_result(fresh_accelerate_state, tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.channels_last = True
    plain, images, _ = resnet_and_batch()
    nhwc, _, _ = resnet_and_batch()
    apply_model_options(nhwc, cfg)
    assert nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    trainer = Trainer(cfg, TinyTask(cfg))
    batch = trainer.cast_inputs({"image": images, "label": torch.zeros(4)})
    assert batch["image"].is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous(
        memory_format=torch.channels_last
    )
    plain.eval(), nhwc.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc(batch["image"]), plain(images), rtol=1e-4, atol=1e-4)


def test_compiled_run_checkpoints_resumes_and_exports_plain_names(fresh_accelerate_state, tmp_path):
    cfg = tiny_config(tmp_path, ema_decay=0.9)
    cfg.model.compile = True
    trainer = Trainer(cfg, TinyTask(cfg))
    assert type(trainer.model).__name__ == "OptimizedModule"  # accelerate compiled it
    trainer.fit()
    names = set(load_file(tmp_path / "final" / "model.safetensors")) | set(
        load_file(tmp_path / "final" / "model_ema.safetensors")
    )
    assert names and not any("_orig_mod" in n for n in names)  # loadable into the plain model
    torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).load_state_dict(
        load_file(tmp_path / "final" / "model.safetensors")
    )

    reset_accelerator_state()
    cfg.checkpoint.resume, cfg.loop.epochs = "auto", 3
    resumed = Trainer(cfg, TinyTask(cfg))
    assert resumed.state.global_step == trainer.state.global_step
    saved = load_file(tmp_path / "checkpoints" / str(trainer.state.global_step) / "model.safetensors")
    current = resumed.bare_model().state_dict()
    assert all(torch.equal(current[k], v) for k, v in saved.items())
    resumed.fit()  # trains on from the checkpoint, compiled again
    assert resumed.state.global_step > trainer.state.global_step


def test_the_classification_entry_imports_neither_deepspeed_nor_transformers(tmp_path):
    """What a DDP launch of the classification recipe imports before it builds anything (its
    script, the trainer, the CLI) holds neither library: importing deepspeed costs about 2 s of
    every launch (it imports mlflow for its autotuner), transformers more. core/ruff.toml bans
    them at module level in core/; this also catches them arriving through a recipe or a
    dependency's module level."""
    code = (
        "import sys, recipes.classification.train, core.trainer, core.commands.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'transformers'}))"
    )
    # ... and neither does a whole run: two steps with a checkpoint each, the weight average and
    # the export (accelerate's unwrap_model would import deepspeed: core/distributed.py bare_module).
    code += (
        "\nfrom core.entry import train\n"
        "from recipes.classification.task import ClassificationConfig, ClassificationTask\n"
        "train(ClassificationConfig, ClassificationTask, ['--config', 'recipes/classification/configs/digits.yaml', "
        "'--model.name', 'test_vit', '--model.kwargs', '{img_size: 32}', '--loop.max_steps', '2', "
        "'--checkpoint.every_steps', '1', '--loop.ema_decay', '0.9', '--logging.progress_bar', 'false', "
        f"'--output-dir', {str(tmp_path)!r}])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'transformers'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-2:] == ["[]", "[]"], proc.stdout[-2000:]
