"""shardvision export of a run's checkpoints: ZeRO-1/3 shards consolidated as DeepSpeed's own
zero_to_fp32.py does, a DDP checkpoint equal to the run's final weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    DIGITS,
    QUICK,
    accelerate_config,
    last_launch,
    launch,
)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_export_equals_deepspeeds_own_consolidation(request, tmp_path, stage):
    """ZeRO-1: resnet18, its BatchNorm buffers beside the shards. ZeRO-3: the tiny ViT's weights
    partitioned, with its EMA (conftest's short_zero3_run, also test_background_saves.py's)."""
    import timm

    if stage == 1:
        run = tmp_path / "run"
        zero1 = dict(launcher="accelerate", accelerate_config=accelerate_config("deepspeed_zero1.yaml"))
        launch(["--config", DIGITS, *QUICK, "--loop.max_steps", "2", "--output-dir", str(run)], **zero1)
        model = timm.create_model("resnet18", num_classes=10)
    else:
        run = request.getfixturevalue("short_zero3_run")
        model = timm.create_model("test_vit", num_classes=10, img_size=32)
    assert last_launch(run)["zero_stage"] == stage
    checkpoint = run / "checkpoints" / "2"
    shardvision = str(Path(sys.executable).parent / "shardvision")

    refused = subprocess.run(
        [shardvision, "export", str(checkpoint), str(tmp_path / "ours")], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "DeepSpeed checkpoint: its shards are Python pickles" in refused.stderr
    subprocess.run(
        [shardvision, "export", str(checkpoint), str(tmp_path / "ours"), "--allow-pickle"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            str(checkpoint / "zero_to_fp32.py"),
            str(checkpoint),
            str(tmp_path / "theirs"),
            "--safe_serialization",
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = (
        load_file(tmp_path / "ours" / "model.safetensors"),
        load_file(tmp_path / "theirs" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "ours" / "config.yaml").is_file()

    from core.weights import load_weights

    load_weights(model, str(tmp_path / "ours" / "model.safetensors"))  # strict: every parameter and buffer


def test_ddp_export_equals_the_final_weights(ddp_reference, tmp_path):
    shardvision = str(Path(sys.executable).parent / "shardvision")
    subprocess.run(
        [shardvision, "export", str(ddp_reference / "checkpoints" / "22"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    a, b = load_file(tmp_path / "model.safetensors"), load_file(ddp_reference / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
