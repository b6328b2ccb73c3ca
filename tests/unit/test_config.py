"""Config parsing: YAML + dotted overrides, precise errors, the resolved copy, shipped configs."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from core.config_parsing import load_config, parse_args, save_config
from core.errors import ConfigError
from recipes.classification.task import ClassificationConfig
from tests.helpers import REPO


def parse(*argv: str) -> ClassificationConfig:
    return parse_args(ClassificationConfig, list(argv))


def test_yaml_then_cli_overrides(tmp_path):
    cfg = parse(
        "--config",
        str(REPO / "recipes/classification/configs/digits.yaml"),
        "--optim.lr",
        "3e-4",
        "--loop.epochs=5",
        "--output-dir",
        str(tmp_path),
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.loop.epochs == 5
    assert cfg.output_dir == str(tmp_path)
    assert cfg.model.name == "resnet18"  # from the YAML
    assert cfg.data.hflip == 0.0


def test_launcher_flags_map_to_keys():
    cfg = parse(
        "--resume", "auto", "--local_rank=1", "--data.scale", "[0.5, 1.0]", "--model.kwargs", "{drop_rate: 0.1}"
    )
    assert cfg.checkpoint.resume == "auto"
    assert cfg.data.scale == [0.5, 1.0]
    assert cfg.model.kwargs == {"drop_rate": 0.1}


def test_bare_flag_means_true_and_no_means_no():
    assert parse("--loop.precision", "no").loop.precision == "no"
    assert parse("--logging.progress_bar").logging.progress_bar is True


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"--optim\.lrr.*unknown key 'optim\.lrr'.*Did you mean 'optim\.lr'"):
        parse("--optim.lrr", "0.1")


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'loop\.epocs'.*Did you mean 'loop\.epochs'"):
        parse("--config", str(bad))


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"--loop\.epochs expects int, got 'three'"):
        parse("--loop.epochs", "three")
    with pytest.raises(ConfigError, match=r"loop\.epochs expects int, got 2\.5"):
        parse("--loop.epochs", "2.5")


def test_bad_choice_lists_valid_values():
    with pytest.raises(ConfigError, match=r"loop\.precision.*'bf61'.*Did you mean 'bf16'.*Valid: no, bf16, fp16"):
        parse("--loop.precision", "bf61")
    with pytest.raises(ConfigError, match=r"optim\.name: unknown optimizer 'adamww'.*Did you mean 'adamw'"):
        parse("--optim.name", "adamww")


def test_bad_values_are_rejected():
    with pytest.raises(ConfigError, match=r"optim\.lr must be > 0, got -1\.0"):
        parse("--optim.lr", "-1")
    with pytest.raises(ConfigError, match=r"data\.micro_batch_size must be even with mixup"):
        parse("--data.mixup_alpha", "0.8", "--data.micro_batch_size", "7")
    with pytest.raises(ConfigError, match=r"model\.weights: file not found"):
        parse("--weights", "/nonexistent/model.safetensors")
    with pytest.raises(ConfigError, match=r"--eval-only needs --weights"):
        parse("--eval-only")


def test_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("loop: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        parse("--config", str(bad))
    with pytest.raises(ConfigError, match=r"--config: file not found"):
        parse("--config", str(tmp_path / "missing.yaml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = parse("--optim.lr", "0.01", "--data.scale", "[0.5, 1.0]", "--loop.precision", "bf16")
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(ClassificationConfig, str(path))
    assert again == cfg
    assert yaml.safe_load(path.read_text())["loop"]["precision"] == "bf16"


def config_class(recipe: str) -> type:
    from recipes.detection.task import DetectionConfig
    from recipes.segmentation.task import SegmentationConfig

    return {"classification": ClassificationConfig, "detection": DetectionConfig, "segmentation": SegmentationConfig}[
        recipe
    ]


@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(REPO / "recipes/*/configs/*.yaml"))), ids=lambda p: p.split("recipes/")[1]
)
def test_every_shipped_recipe_config_parses(path, monkeypatch):
    """Drift guard: a config that no longer matches the dataclasses fails here, not on a cluster.
    (Dataset folders of the real-scale configs do not exist here, so data.root is not checked.)"""
    data = yaml.safe_load(open(path))
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "exists", lambda p: True)
    monkeypatch.setattr(os.path, "isfile", lambda p: real_isfile(p) or not str(p).endswith(".yaml"))
    cfg = load_config(config_class(path.split("recipes/")[1].split("/")[0]), path)
    assert cfg.model.name == data["model"]["name"]


@pytest.mark.parametrize("recipe", ["classification", "detection", "segmentation"])
def test_configuration_reference_names_every_key(recipe):
    from core.config_parsing import all_keys

    text = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in all_keys(config_class(recipe)) if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"
