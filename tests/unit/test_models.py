"""The classification model factory: timm names and local transformers configs, never the hub."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from recipes.classification.models import ClassificationModelConfig, build_model, logits_of
from tests.helpers import REPO


def test_timm_model_random_init():
    model = build_model(ClassificationModelConfig(name="test_resnet", num_classes=7))
    assert logits_of(model(torch.randn(2, 3, 32, 32))).shape == (2, 7)


def test_unknown_timm_name_suggests():
    with pytest.raises(ConfigError, match=r"'resnet19' is not a timm model; did you mean .*resnet18"):
        build_model(ClassificationModelConfig(name="resnet19"))


def test_transformers_model_from_local_config():
    cfg = ClassificationModelConfig(
        source="transformers", name=str(REPO / "recipes/classification/configs/hf_vit_tiny"), num_classes=10
    )
    model = build_model(cfg)
    assert type(model).__name__ == "ViTForImageClassification"
    assert logits_of(model(torch.randn(2, 3, 32, 32))).shape == (2, 10)
    with pytest.raises(ConfigError, match="must be a local config.json or a folder"):
        build_model(ClassificationModelConfig(source="transformers", name="google/vit-base-patch16-224"))
