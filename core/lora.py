"""LoRA fine-tuning through peft (model.lora_rank > 0): low-rank adapters in a model's linear
layers, every other weight frozen but the head's, which trains fully (a new task's head has
nothing to adapt from).

The adapters are injected in place (peft's `inject_adapter_in_model`), not through
`get_peft_model`: the model keeps its own class and names (`blocks.0.attn.qkv.base_layer.weight`,
`blocks.0.attn.qkv.lora_A.default.weight`), so timm's parameter groups, gradient checkpointing,
ZeRO-3's partitioned build and the trainer's export see the model they know, without PeftModel's
`base_model.model.` in front of every name. Frozen weights get no gradient and, through timm's
grouping (which leaves them out), no optimizer state.

What a run exports (`export_lora`): the merged model under the plain model's
names, which its own library loads, and the adapter beside it in peft's layout
(adapter_config.json, adapter_model.safetensors) for `PeftModel.from_pretrained(base, folder)`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch

from core.config import ModelConfig
from core.errors import ConfigError, WeightsError
from core.weights import stored_tensors

ADAPTER = "default"  # peft's adapter name; the one adapter a run trains
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

# The layers each family adapts by default (regular expressions matched against whole module names).
DEFAULT_TARGETS = {
    # timm ViT and DeiT blocks: attention projections and MLP linears, not the patch embedding.
    "VisionTransformer": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
    # timm ConvNeXt: the pointwise convolutions (linears over channels unless conv_mlp).
    "ConvNeXt": r"stages\.\d+\.blocks\.\d+\.mlp\.(fc1|fc2)",
    # transformers ViT (5.x names): the query/key/value and output projections, both MLP linears.
    "ViTForImageClassification": r"vit\.layers\.\d+\.(attention\.[qkvo]_proj|mlp\.(fc1|fc2))",
}


def lora_enabled(cfg: ModelConfig) -> bool:
    return cfg.lora_rank > 0


def base_reference(cfg: ModelConfig, accelerator: Any) -> dict | None:
    """What a LoRA run's checkpoints need besides themselves (they hold only what trains): the
    frozen base's file, its SHA-256 and the adapters' settings, which a resume checks
    (core/checkpoint/resume.py). The file is read by the main process only."""
    if not lora_enabled(cfg) or cfg.weights is None:
        return None
    from accelerate.utils import broadcast_object_list

    digest = [_sha256(cfg.weights) if accelerator.is_main_process else None]
    broadcast_object_list(digest)
    return {
        "path": os.path.abspath(cfg.weights),
        "sha256": digest[0],
        "rank": cfg.lora_rank,
        "alpha": cfg.lora_alpha,
        "targets": list(cfg.lora_targets),
        "modules_to_save": cfg.lora_modules_to_save,
    }


def checked_base(reference: dict | None, checkpoint: str) -> str | None:
    """The base weights file a LoRA checkpoint names (None for a checkpoint that holds every
    weight), once its checksum is the one recorded."""
    if reference is None:
        return None
    path = reference["path"]
    if not os.path.isfile(path) or _sha256(path) != reference["sha256"]:
        raise WeightsError(
            f"{checkpoint} holds the trained weights of a LoRA run; its frozen base is {path} with SHA-256 "
            f"{reference['sha256']}, which is {'not there' if not os.path.isfile(path) else 'another file now'}"
        )
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def target_pattern(model: torch.nn.Module, cfg: ModelConfig) -> str:
    if cfg.lora_targets:
        return "|".join(f"(?:{p})" for p in cfg.lora_targets)
    family = type(model).__name__
    if family not in DEFAULT_TARGETS:
        raise ConfigError(
            f"model.lora_targets: no default for {cfg.name} ({family}); name the layers to adapt as "
            f"regular expressions of module names (defaults exist for {', '.join(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[family]


def head_modules(model: torch.nn.Module, cfg: ModelConfig) -> list[str]:
    """The modules trained fully: model.lora_modules_to_save, else the classifier timm's
    pretrained_cfg names or transformers' `classifier`."""
    if cfg.lora_modules_to_save is not None:
        names = list(cfg.lora_modules_to_save)
    else:
        timm_head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        names = [timm_head] if isinstance(timm_head, str) else list(timm_head or [])
        if not names and isinstance(getattr(model, "classifier", None), torch.nn.Module):
            names = ["classifier"]
        if not names:
            raise ConfigError(
                f"model.lora_modules_to_save: no classifier found in {cfg.name} ({type(model).__name__}); name the "
                "modules to train fully beside the adapters ([] for none)"
            )
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing:
        raise ConfigError(f"model.lora_modules_to_save: {cfg.name} has no module {missing[0]!r}")
    return names


def peft_config(model: torch.nn.Module, cfg: ModelConfig):  # -> peft.LoraConfig
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_pattern(model, cfg),
        modules_to_save=head_modules(model, cfg) or None,
    )


def apply_lora(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Inject the adapters into `model` in place and freeze everything but them and the head.
    Their initial values come from `seed` alone, whatever drew from the random stream before (a
    partitioned ZeRO-3 build draws otherwise than a whole one)."""
    from peft import inject_adapter_in_model

    config = peft_config(model, cfg)
    heads = config.modules_to_save or []
    config.modules_to_save = None  # trained in place: peft would train a copy beside the original
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as e:
            raise ConfigError(f"model.lora_targets ({config.target_modules}): {e}") from None
    for name in heads:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def export_lora(
    state_dict: dict[str, torch.Tensor],
    build_model: Callable[[], torch.nn.Module],
    cfg: ModelConfig,
    folder: str,
    save: Callable[[dict[str, torch.Tensor], str], None],
    base: str | None = None,
) -> None:
    """From a LoRA run's `state_dict`: `folder/model.safetensors`, the merged model under the
    plain model's names, and beside it the adapter as peft's `save_pretrained` writes it
    (adapter_config.json, adapter_model.safetensors: the LoRA matrices and the fully trained
    head). Each adapted weight is merged by peft's own `get_delta_weight`, on a meta-built copy of
    the model holding `state_dict`'s tensors; the run's own model is not touched. A checkpoint's
    `state_dict` holds what trains only, and is completed from `base` (TrainerState.lora_base)."""
    from peft.tuners.lora import LoraLayer

    with torch.device("meta"):
        shell = build_model()
    apply_lora(shell, cfg, seed=0)  # its values are state_dict's
    config = peft_config(shell, cfg)
    frozen = [k for k in shell.state_dict() if k not in state_dict]
    if frozen:
        stored = stored_tensors(base) if base else {}
        absent = [k for k in frozen if k.replace(".base_layer.", ".") not in stored]
        if absent:
            raise WeightsError(f"{base or 'no base weights file'}: no {absent[0]}, a frozen weight of the LoRA run")
        state_dict = {**state_dict, **{k: stored[k.replace(".base_layer.", ".")].read() for k in frozen}}
    shell.load_state_dict(state_dict, strict=True, assign=True)
    merged = {}
    with torch.no_grad():
        for name, module in shell.named_modules():
            if isinstance(module, LoraLayer):
                layer: Any = module  # peft's Linear or Conv2d
                weight = layer.get_base_layer().weight
                delta = layer.get_delta_weight(ADAPTER).float()  # one rounding to half weights, not two
                merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    plain, adapter = {}, {}
    heads = config.modules_to_save or []
    for key, value in state_dict.items():
        if ".lora_" in key or any(key.startswith(f"{head}.") for head in heads):
            adapter["base_model.model." + key.replace(f".{ADAPTER}.", ".")] = value
        if ".lora_" not in key:
            key = key.replace(".base_layer.", ".")
            plain[key] = merged.get(key, value)
    save(plain, os.path.join(folder, "model.safetensors"))
    config.base_model_name_or_path = cfg.weights
    config.save_pretrained(folder)
    save(adapter, os.path.join(folder, ADAPTER_WEIGHTS))


def adapted_layers(model: torch.nn.Module) -> int:
    """How many layers of `model` carry an adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())
