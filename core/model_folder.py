"""What the recipes' model folders share. A transformers model's config.json names its labels
(`save_labelled_config`). A torchvision model has no config file of its own: beside
`model.safetensors`, `torchvision_model.json` holds what `torchvision.models.get_model` needs to
build the same model ("name", "kwargs"), the names of its output labels, and the run's
evaluation preprocessing. docs/detection.md and docs/segmentation.md show the loading code, and
the tests run that code as the docs print it. (timm and transformers models get their own
library's folder: the recipes' write_model_folder.)"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

TORCHVISION_SPEC = "torchvision_model.json"


def write_torchvision_spec(
    folder: str, name: str, kwargs: dict[str, Any], labels: list[str], preprocessing: dict
) -> None:
    spec = {
        "library": "torchvision",
        "name": name,
        "kwargs": {"weights": None, "weights_backbone": None, **kwargs},
        "labels": labels,
        "preprocessing": preprocessing,
    }
    with open(os.path.join(folder, TORCHVISION_SPEC), "w") as f:
        json.dump(spec, f, indent=2)


def save_labelled_config(model: Any, names: list[str], folder: str) -> None:
    """`model.config` as config.json in `folder`, label i named names[i] (id2label, label2id), so
    that transformers' `from_pretrained(folder)` names them; the model's own config is untouched."""
    config = copy.deepcopy(model.config)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.save_pretrained(folder)
