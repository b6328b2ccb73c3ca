"""LoRA fine-tunes through peft on 2 gloo ranks, from a local base file: the tiny timm ViT's
attention and MLP linears adapted (rank 4), its head trained fully, everything else frozen. Under
DDP a killed run resumes bit for bit; under ZeRO-3 (weights partitioned) a killed and resumed run
follows the uninterrupted DDP run, as ZeRO-2 and FSDP2 runs do. What a checkpoint and the export
hold is read back: only what trains (and its optimizer state), the merged model loadable strictly
by timm alone, the adapter by peft alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    DDP_LOSS_TOLERANCE,
    DDP_WEIGHT_TOLERANCE,
    STOPPED_AT_3_OF_6,
    TINY_VIT,
    accelerate_config,
    assert_resumed_exactly,
    last_launch,
    launch,
    run_killed_after_checkpoint,
    train_losses,
    without_shardvision,
)

ADAPTED = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")  # the family default

# The merged export through timm alone, the adapter through peft alone on the base weights: one
# batch, both outputs.
LIBRARY_ALONE = """
import json, sys
import timm, torch
from peft import PeftModel
from safetensors.torch import load_file

final, base_file = sys.argv[1], sys.argv[2]
merged = timm.create_model("local-dir:" + final, pretrained=True).eval()
base = timm.create_model("test_vit", img_size=32, num_classes=10)
base.load_state_dict(load_file(base_file))
adapted = PeftModel.from_pretrained(base, final).eval()
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = merged(x), adapted(x)
print(json.dumps({"difference": (a - b).abs().max().item(), "scale": a.abs().max().item()}))
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 'pretrained' tiny ViT of 10 classes: the base weights every run here starts from."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_vit", img_size=32, num_classes=10)
    path = tmp_path_factory.mktemp("base") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def lora_args(base: Path) -> list[str]:
    return [
        *TINY_VIT,
        *STOPPED_AT_3_OF_6,
        "--model.weights",
        str(base),  # the head too: a partitioned ZeRO-3 build initialises a fresh one otherwise than DDP's
        "--model.lora_rank",
        "4",
        "--optim.lr",
        "0.01",
    ]


@pytest.fixture(scope="module")
def ddp_lora(base, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank DDP LoRA run: what the killed and the ZeRO-3 runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("ddp_lora")
    launch([*lora_args(base), "--output-dir", str(run_dir)], launcher="torchrun")
    return run_dir


def test_ddp_lora_trains_the_adapters_and_head_only_resumes_bitwise_and_exports_for_timm_and_peft(
    ddp_lora, base, ddp_reference, tmp_path
):
    run = last_launch(ddp_lora)
    assert run["trainable_parameters"] < 0.1 * run["parameters"], run

    # Killed after checkpoint 3, resumed: the uninterrupted run, bit for bit.
    args = [*lora_args(base), "--output-dir", str(tmp_path)]
    run_killed_after_checkpoint(args, tmp_path, 3, launcher="torchrun")
    launch([*args, "--resume", "auto"], launcher="torchrun")
    assert_resumed_exactly(tmp_path, ddp_lora, 3)

    # The checkpoint holds what trains and its optimizer state only, and names its base.
    checkpoint = ddp_lora / "checkpoints" / "3"
    saved = load_file(checkpoint / "model.safetensors")
    assert saved and all(".lora_" in name or name.startswith("head.") for name in saved), sorted(saved)
    assert len(saved) == 2 * 24 + 2  # A and B of 4 linears in 6 blocks, the head's weight and bias
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)  # noqa: TID251 (tensors only)
    assert len(optimizer["state"]) == len(saved)
    full = next((ddp_reference / "checkpoints").glob("[0-9]*"))  # a full fine-tune of the same ViT
    sizes = [sum((c / f).stat().st_size for f in ("model.safetensors", "optimizer.bin")) for c in (checkpoint, full)]
    assert sizes[0] < 0.15 * sizes[1], sizes

    # The merged export: frozen weights as the base had them, adapted ones and the head moved.
    merged, start = load_file(ddp_lora / "final" / "model.safetensors"), load_file(base)
    assert merged.keys() == start.keys()
    moved = {name for name in merged if not torch.equal(merged[name], start[name])}
    assert moved == {name for name in merged if name.endswith(ADAPTED) or name.startswith("head.")}, sorted(moved)

    loaded = without_shardvision(LIBRARY_ALONE, str(ddp_lora / "final"), str(base), cwd=tmp_path)
    assert loaded["difference"] < 1e-5 * max(1.0, loaded["scale"]), loaded


def test_zero3_lora_killed_and_resumed_follows_the_ddp_run(ddp_lora, base, zero_configs, tmp_path):
    args = [*lora_args(base), "--output-dir", str(tmp_path)]
    zero3 = dict(launcher="accelerate", accelerate_config=zero_configs["zero3"])
    run_killed_after_checkpoint(args, tmp_path, 3, **zero3)
    launch([*args, "--resume", "auto"], **zero3)
    run = last_launch(tmp_path)
    assert run["zero_stage"] == 3 and run["resumed_from"] == str(tmp_path / "checkpoints" / "3"), run
    assert run["parameters_on_this_rank"] < 0.6 * run["parameters"], run  # the frozen base partitioned too

    expected, got = train_losses(ddp_lora), train_losses(tmp_path)
    assert sorted(got) == sorted(expected)
    for step, losses in got.items():
        assert losses == pytest.approx([expected[step][0]] * len(losses), rel=DDP_LOSS_TOLERANCE), step
    ddp, zero = (load_file(r / "final" / "model.safetensors") for r in (ddp_lora, tmp_path))
    assert ddp.keys() == zero.keys()
    for name, value in ddp.items():
        torch.testing.assert_close(zero[name], value, **DDP_WEIGHT_TOLERANCE, msg=name)

    # DeepSpeed's checkpoint leaves the frozen base out; the export completes it from the base file.
    shards = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "6" / "pytorch_model").iterdir())
    assert shards < 0.25 * base.stat().st_size * 4, shards  # a full fine-tune's fp32 weights and Adam moments: 4x
    exported = tmp_path / "exported"
    command = ["export", str(tmp_path / "checkpoints" / "6"), str(exported), "--allow-pickle"]
    launch(command, launcher="module", script="core/commands/cli.py")
    for name, value in load_file(exported / "model.safetensors").items():
        torch.testing.assert_close(value, zero[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("strategy", ["deepspeed_zero2.yaml", "fsdp.yaml"])
def test_zero2_and_fsdp2_lora_follow_the_ddp_run(ddp_lora, base, strategy, tmp_path):
    launch(
        [*lora_args(base), "--output-dir", str(tmp_path)],
        launcher="accelerate",
        accelerate_config=accelerate_config(strategy),
    )
    run = last_launch(tmp_path)
    assert run["strategy"] == ("fsdp" if strategy == "fsdp.yaml" else "deepspeed"), run
    expected, got = train_losses(ddp_lora), train_losses(tmp_path)
    assert sorted(got) == sorted(expected)
    for step, losses in got.items():
        assert losses == pytest.approx([expected[step][0]], rel=DDP_LOSS_TOLERANCE), step
    ddp, other = (load_file(r / "final" / "model.safetensors") for r in (ddp_lora, tmp_path))
    assert ddp.keys() == other.keys()
    for name, value in ddp.items():
        torch.testing.assert_close(other[name], value, **DDP_WEIGHT_TOLERANCE, msg=name)
