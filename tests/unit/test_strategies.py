"""Every shipped accelerate and DeepSpeed config loads through the libraries' own classes, and
the Accelerator builder refuses what it promised to refuse."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from core.distributed import (
    build_accelerator,
    build_dataloader_config,
    build_fsdp_plugin,
    fill_deepspeed_config,
    resolve_strategy,
)
from core.errors import ConfigError
from recipes.classification.task import ClassificationConfig
from tests.helpers import REPO

ACCELERATE_CONFIGS = sorted(glob.glob(str(REPO / "accelerate_configs/*.yaml")))
DS_CONFIGS = sorted(glob.glob(str(REPO / "ds_configs/*.json")))


def test_the_promised_configs_exist():
    names = {os.path.basename(p) for p in ACCELERATE_CONFIGS + DS_CONFIGS}
    assert {
        "single_gpu.yaml",
        "multi_gpu_ddp.yaml",
        "multi_node_ddp.yaml",
        "fsdp.yaml",
        "deepspeed_zero1.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "zero1.json",
        "zero2.json",
        "zero2_offload.json",
        "zero3.json",
        "zero3_offload.json",
    } <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=os.path.basename)
def test_accelerate_config_loads(path):
    config = load_config_from_file(path)
    if config.distributed_type == DistributedType.DEEPSPEED:
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), f"{path} points at missing {ds_file}"
    assert config.mixed_precision in (None, "no"), "precision belongs to the run config (loop.precision)"


def test_fsdp_accelerate_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    """What `accelerate launch --config_file fsdp.yaml` exports, read back by accelerate's plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "accelerate_configs/fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap is None  # shardvision picks each model's units (test_fsdp.py)


def test_run_config_fsdp_plugin():
    cfg = ClassificationConfig()
    cfg.distributed.fsdp_auto_wrap_classes = ["Block"]
    cfg.distributed.fsdp_reshard_after_forward = False
    plugin = build_fsdp_plugin(cfg)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["Block"]


def test_batches_reach_the_gpu_without_blocking_only_from_pinned_memory(fresh_accelerate_state):
    cfg = ClassificationConfig()
    cfg.seed = 7
    on_gpu = build_dataloader_config(cfg, on_gpu=True)
    assert on_gpu.non_blocking and on_gpu.use_seedable_sampler and on_gpu.data_seed == 7
    assert not build_dataloader_config(cfg, on_gpu=False).non_blocking
    cfg.data.pin_memory = False  # an unpinned non-blocking copy is synchronous anyway
    assert not build_dataloader_config(cfg, on_gpu=True).non_blocking
    cfg.data.pin_memory = True
    assert build_accelerator(cfg).non_blocking == torch.cuda.is_available()


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_deepspeed_config_filled_and_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = ClassificationConfig()
    cfg.data.micro_batch_size, cfg.loop.grad_accum_steps, cfg.loop.precision, cfg.loop.clip_grad_norm = (
        16,
        4,
        "bf16",
        1.0,
    )
    filled = fill_deepspeed_config(
        json.load(open(path)), cfg, world_size=1, source=path
    )  # DeepSpeedConfig checks against this process's world
    ds = DeepSpeedConfig(filled)
    assert ds.train_micro_batch_size_per_gpu == 16 and ds.gradient_accumulation_steps == 4
    assert ds.train_batch_size == 16 * 4
    assert ds.gradient_clipping == 1.0 and ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.zero_optimization_stage == int(os.path.basename(path)[4])


def test_deepspeed_config_contradicting_the_run_config_is_an_error():
    cfg = ClassificationConfig()
    cfg.data.micro_batch_size = 16
    with pytest.raises(
        ConfigError, match=r"x\.json: train_micro_batch_size_per_gpu=8 contradicts the run config \(16\)"
    ):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 8}, cfg, 1, "x.json")
    with pytest.raises(ConfigError, match=r"x\.json: bf16\.enabled=True contradicts loop\.precision='no'"):
        fill_deepspeed_config({"bf16": {"enabled": True}}, cfg, 1, "x.json")
    with pytest.raises(ConfigError, match=r"remove the \"optimizer\""):
        fill_deepspeed_config({"optimizer": {"type": "AdamW"}}, cfg, 1, "x.json")


def test_strategy_must_agree_with_the_launcher(monkeypatch):
    cfg = ClassificationConfig()
    cfg.distributed.strategy = "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"strategy='ddp' contradicts the launcher, which set up 'deepspeed'"):
        resolve_strategy(cfg)
    cfg.distributed.strategy = "auto"
    assert resolve_strategy(cfg) == "deepspeed"


def test_deepspeed_without_a_json_lists_the_shipped_ones(fresh_accelerate_state):
    cfg = ClassificationConfig()
    cfg.distributed.strategy = "deepspeed"
    with pytest.raises(ConfigError, match=r"no DeepSpeed JSON was given.*ds_configs/zero2\.json"):
        build_accelerator(cfg)


def test_cpu_refusals(fresh_accelerate_state):
    cfg = ClassificationConfig()
    cfg.loop.precision = "fp16"
    with pytest.raises(ConfigError, match=r"fp16' needs a GPU"):
        build_accelerator(cfg)
    cfg.loop.precision = "no"
    cfg.distributed.strategy = "fsdp"  # FSDP on CPU runs over gloo, in a launched run (tests/unit/test_fsdp.py)
    with pytest.raises(ConfigError, match=r"'fsdp' on CPU needs a gloo process group.*--nproc_per_node 1"):
        build_accelerator(cfg)


def test_launcher_precision_conflict(fresh_accelerate_state, monkeypatch):
    cfg = ClassificationConfig()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"loop\.precision='no' contradicts the launcher's mixed_precision='bf16'"):
        build_accelerator(cfg)


def _share_buffers_on_rank(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from core.distributed import share_buffers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank's own statistics, as after training on its own batches
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(2))
    for buffer in model.buffers():
        buffer.copy_(
            torch.randint(0, 100, buffer.shape) if not buffer.is_floating_point() else torch.rand(buffer.shape)
        )
    model[2].running_mean.data = model[2].running_mean.to(torch.float64)  # a third dtype
    share_buffers(model)
    from safetensors.torch import save_file

    save_file({k: v for k, v in model.state_dict().items() if "running" in k or "batches" in k}, f"{out}/{rank}.st")
    dist.destroy_process_group()


def test_share_buffers_gives_every_rank_rank_0s_buffers(tmp_path):
    """Two gloo processes with different BatchNorm statistics (float32, float64 and int64
    buffers): afterwards both hold rank 0's, every dtype."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_share_buffers_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    from safetensors.torch import load_file

    zero, one = load_file(tmp_path / "0.st"), load_file(tmp_path / "1.st")
    assert {v.dtype for v in zero.values()} == {torch.float32, torch.float64, torch.int64}
    for name, value in zero.items():
        assert torch.equal(one[name], value), name
