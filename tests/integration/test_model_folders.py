"""A run's final/, and what `shardvision export` makes of any of its checkpoints, is a model folder
of the model's own library: timm and transformers load it alone (a separate Python process that
imports neither shardvision's core nor its recipes), name the data's classes, and, through the
preprocessing the folder describes, give the logits shardvision's own evaluation gives on the
same images; `--onnx`'s model.onnx gives them under onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from core.config_parsing import parse_args
from recipes.classification.data import Digits
from recipes.classification.task import ClassificationConfig, ClassificationTask
from tests.helpers import HF_VIT_3_STEPS, ZERO3_LAUNCH, without_shardvision

# What a user of the library alone writes: load the folder, preprocess image files as the folder
# says, and classify them. Prints the logits and the class names as JSON.
LIBRARY_ALONE = """
import json, sys
import torch
from PIL import Image

library, folder, *files = sys.argv[1:]
images = [Image.open(f).convert("RGB") for f in files]
with torch.no_grad():
    if library == "timm":
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        transform = create_transform(**resolve_data_config({}, model=model))
        logits = model(torch.stack([transform(image) for image in images]))
        names = model.pretrained_cfg["label_names"]
    else:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt").pixel_values
        logits = model(pixel_values=pixels).logits
        names = [model.config.id2label[i] for i in range(logits.shape[1])]
print(json.dumps({"logits": logits.tolist(), "names": names}))
"""


def shardvision_logits(folder: Path, count: int, with_pixels: bool = False) -> Any:
    """The logits shardvision's evaluation computes for the first `count` validation samples with
    the weights and config.yaml in `folder` (and the pixels it computed them from)."""
    cfg = parse_args(ClassificationConfig, ["--config", str(folder / "config.yaml")])
    task = ClassificationTask(cfg)
    model = task.build_model().eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    _, evaluation = task.build_datasets()
    batch = torch.stack([evaluation[i]["image"] for i in range(count)])
    with torch.no_grad():
        output = model(batch)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return (logits, batch) if with_pixels else logits


def validation_files(folder: Path, count: int) -> list[Path]:
    """The first `count` digits validation images as PNG files, as a user would have them."""
    digits, files = Digits("val"), []
    for i in range(count):
        files.append(folder / f"val{i}.png")
        digits[i][0].save(files[-1])
    return files


def assert_library_loads_it(library: str, folder: Path, tmp_path: Path) -> None:
    files = validation_files(tmp_path, 8)
    loaded = without_shardvision(LIBRARY_ALONE, library, str(folder), *map(str, files), cwd=tmp_path)
    assert loaded["names"] == [str(i) for i in range(10)]  # the digits' class names
    expected = shardvision_logits(folder, 8)
    np.testing.assert_allclose(np.array(loaded["logits"]), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 0.1  # trained weights, not zeros


def test_timm_loads_final_from_its_local_folder(ddp_reference, tmp_path):
    """The tiny timm ViT of the shared 2-rank DDP run (32 px, its own mean/std and crop)."""
    assert_library_loads_it("timm", ddp_reference / "final", tmp_path)


def test_shardvision_export_of_a_checkpoint_is_the_model_folder_final_is_and_onnx(ddp_reference, tmp_path, capsys):
    """The same run's last checkpoint, exported in a folder of its own, without the run's ranks; with
    --onnx also model.onnx, whose outputs under onnxruntime are shardvision's evaluation logits."""
    import onnxruntime

    from core.commands.export import export_main

    (checkpoint,) = (ddp_reference / "checkpoints").iterdir()
    exported = tmp_path / "exported"
    export_main([str(checkpoint), str(exported), "--onnx"])
    said = capsys.readouterr().out
    assert "a classification model folder (config.json)" in said
    assert f"{exported / 'model.onnx'}: onnxruntime on 8 validation images" in said
    assert_library_loads_it("timm", exported, tmp_path)
    assert (exported / "config.json").read_text() == (ddp_reference / "final" / "config.json").read_text()
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    expected, pixels = shardvision_logits(exported, 16, with_pixels=True)
    (got,) = session.run(None, {"pixel_values": pixels.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_transformers_loads_final_with_its_image_processor(uninterrupted, tmp_path):
    """The transformers ViT's 3 steps under ZeRO-3 (shared with test_sharded_start): its gathered export."""
    run_dir = uninterrupted(HF_VIT_3_STEPS, **ZERO3_LAUNCH)
    assert_library_loads_it("transformers", run_dir / "final", tmp_path)
