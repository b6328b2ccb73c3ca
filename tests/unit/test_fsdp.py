"""FSDP2 on CPU ranks: accelerate's gate, lifted in one place (core/distributed.py
enable_fsdp_on_cpu), and the units each shipped model family is sharded in. The runs themselves
(losses against DDP, kill and resume, other world sizes and strategies) are in
tests/integration/test_fsdp.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin

from core.distributed import choose_fsdp_units
from core.errors import ConfigError
from tests.helpers import REPO, free_port, run_env

# One gloo rank, as torchrun starts it, in a process of its own (a process group cannot be undone).
GATE = textwrap.dedent(
    """
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.tensor import DTensor

    from core.config_parsing import parse_args
    from core.distributed import build_accelerator, reset_accelerator_state
    from recipes.classification.task import ClassificationConfig

    # accelerate alone: an FSDP plugin on CPU ranks is ignored (MULTI_CPU: DDP-like, nothing sharded).
    plain = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    print("accelerate alone:", plain.distributed_type)
    reset_accelerator_state()
    del os.environ["ACCELERATE_USE_FSDP"]  # set by the plugin given above; an FSDP launcher would set it

    cfg = parse_args(ClassificationConfig, ["--distributed.strategy", "fsdp", "--loop.precision", "bf16"])
    acc = build_accelerator(cfg)
    # every later reader of the shared state sees FSDP, also those that build AcceleratorState() anew
    assert acc.is_fsdp2 and AcceleratorState().distributed_type == DistributedType.FSDP
    assert PartialState().distributed_type == DistributedType.FSDP
    assert acc.state.fsdp_plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    weight = model[0].weight
    assert isinstance(weight, DTensor) and weight.device_mesh.device_type == "cpu", weight
    loss = model(torch.randn(3, 4)).float().sum()
    acc.backward(loss)
    optimizer.step()
    print("sharded on", weight.device_mesh)
    """
)


def test_accelerate_still_gates_fsdp_on_cpu_and_shardvision_lifts_it(tmp_path):
    """If accelerate opens FSDP on CPU itself (or moves the gate), the first line changes and
    enable_fsdp_on_cpu must be revisited: an upgrade cannot silently change what runs."""
    env = run_env() | {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run([sys.executable, "-c", GATE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "accelerate alone: DistributedType.MULTI_CPU" in proc.stdout, proc.stdout
    assert "sharded on DeviceMesh((1,), 'cpu'" in proc.stdout, proc.stdout


def units(model: torch.nn.Module, configured: list[str] | None = None) -> list[str]:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    names = choose_fsdp_units(plugin, model, configured or [])
    assert plugin.transformer_cls_names_to_wrap == names
    return names


def classifier(name: str, **kwargs) -> torch.nn.Module:
    from recipes.classification.models import ClassificationModelConfig, build_model

    return build_model(ClassificationModelConfig(name=name, num_classes=10, **kwargs))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", ["BasicBlock"]),
        ("resnet50", ["Bottleneck"]),
        ("test_vit", ["Block"]),
        ("convnext_atto", ["ConvNeXtStage", "ConvNeXtBlock"]),
    ],
)
def test_timm_models_are_sharded_by_the_layer_they_repeat(name, expected):
    assert units(classifier(name)) == expected


def test_transformers_models_name_their_units_and_the_embeddings_stay_accelerates():
    """transformers ViT names ViTEmbeddings and ViTLayer; accelerate makes the patch embeddings a
    unit of their own, so a unit around them would shard them twice: only ViTLayer is kept."""
    vit = classifier(str(REPO / "recipes/classification/configs/hf_vit_tiny"), source="transformers")
    assert units(vit) == ["ViTLayer"]

    from recipes.segmentation.models import SegmentationModelConfig, build_model

    segformer = build_model(
        SegmentationModelConfig(source="transformers", name=str(REPO / "recipes/segmentation/configs/segformer_tiny"))
    )
    assert units(segformer) == ["SegformerStage"]  # its own _no_split_modules
    # accelerate asks every model for its input embeddings; Segformer raises NotImplementedError
    assert segformer.get_input_embeddings() is None


def test_torchvision_detector_units_and_a_wrong_name_listed():
    from recipes.detection.models import DetectionModelConfig, build_model

    def detector(name: str) -> torch.nn.Module:
        return build_model(DetectionModelConfig(name=name, num_classes=3), 128, 128)

    # the backbone's blocks (under torchvision's ModuleDict of layers) and the FPN's
    assert units(detector("fasterrcnn_mobilenet_v3_large_320_fpn")) == ["Conv2dNormActivation", "InvertedResidual"]
    resnet = detector("fasterrcnn_resnet50_fpn")
    assert units(resnet) == ["Bottleneck", "Conv2dNormActivation"]  # never the plain Sequential of each stage
    assert units(resnet, ["TwoMLPHead"]) == ["TwoMLPHead"]
    with pytest.raises(ConfigError, match=r"FSDP units \['Block'\] are not module classes of this model.*Bottleneck"):
        units(resnet, ["Block"])
