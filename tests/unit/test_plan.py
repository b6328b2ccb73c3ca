"""`shardvision plan` (core/commands/plan.py) against independent references: torch's MemTracker for the
activations of a real step, DeepSpeed's own model-state estimator for ZeRO-2, and the plan's
arithmetic for the largest micro-batch and the pick. Its figures against the memory a 2-rank run
really holds are benchmarks/memory_per_rank.py's (docs/performance.md)."""

from __future__ import annotations

import json

import pytest
import torch

from core.commands.cli import main
from core.commands.plan import Cluster, GiB, compute_mode, make_plan, model_states, optimizer_state_bytes, parse_memory
from core.config_parsing import parse_args
from recipes.classification.task import ClassificationConfig, ClassificationTask
from tests.helpers import DIGITS, REPO


def digits(tmp_path, *overrides: str):
    cfg = parse_args(ClassificationConfig, ["--config", str(REPO / DIGITS), "--output-dir", str(tmp_path), *overrides])
    return cfg, ClassificationTask(cfg)


def memtracker_activations(task, cfg, micro_batch: int, half: bool) -> int:
    """What torch's MemTracker files as activations at the end of one real forward of the
    micro-batch (the model in bf16 for DeepSpeed's way, autocast over fp32 for DDP's)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState

    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters())
    train_set, _ = task.build_datasets()
    batch = task.collate([train_set[i] for i in range(micro_batch)])
    if half:
        model.to(torch.bfloat16)
        batch["image"] = batch["image"].to(torch.bfloat16)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=not half):
        task.training_step(model, batch).backward()
    (snapshot,) = tracker.memory_tracking[model].snapshots[_ModState.POST_FW]
    return snapshot[torch.device("cpu")][_MemRefType.ACT]


@pytest.mark.parametrize("strategy", ["DDP", "ZeRO-3"])
def test_activations_extrapolated_from_two_small_batches_match_a_real_step(tmp_path, strategy):
    cfg, task = digits(tmp_path, "--loop.precision", "bf16", "--data.micro_batch_size", "24")
    plan = make_plan("classification", cfg, task, Cluster(1, 2, 16 * GiB))
    planned = next(r for r in plan.rows if r.strategy == strategy).activations
    measured = memtracker_activations(task, cfg, 24, half=compute_mode(strategy, "bf16") == "half")
    assert abs(planned / measured - 1) < 0.10, (strategy, planned, measured)


def test_zero2_states_equal_deepspeeds_own_estimate(tmp_path):
    """DeepSpeed's estimator: 2 bytes per parameter of half weights, and per rank's share 2 of
    16-bit gradients, 4 of fp32 gradients, 4 of fp32 master weights and 8 of Adam state. The plan
    counts the 16-bit gradient partition in flight (it is freed before the step's peak)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg, task = digits(tmp_path)
    model = task.build_model()
    params = sum(p.numel() for p in model.parameters())
    plan = make_plan("classification", cfg, task, Cluster(2, 4, 80 * GiB))
    zero2 = model_states("ZeRO-2", plan.facts, half=True, world=8, ema=False)
    _, expected = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=4, num_nodes=2, cpu_offload=False)
    half_grads = 2 * params // 8
    assert abs(zero2.states + half_grads - expected) <= 8  # integer division per term
    assert zero2.in_flight >= half_grads


def test_optimizer_state_is_measured_from_the_configured_optimizer(tmp_path):
    cfg, _ = digits(tmp_path)
    cfg.optim.name = "adamw"
    assert optimizer_state_bytes(cfg.optim) == 8  # two fp32 moments
    cfg.optim.name = "momentum"
    assert optimizer_state_bytes(cfg.optim) == 4  # one momentum buffer


def test_largest_micro_batch_is_the_last_that_fits(tmp_path):
    cfg, task = digits(tmp_path, "--loop.precision", "bf16", "--loop.ema_decay", "0.999")
    cluster = Cluster(1, 2, 2 * GiB)
    plan = make_plan("classification", cfg, task, cluster)
    for row in plan.rows:
        act = plan.activations[compute_mode(row.strategy, "bf16")]
        base = row.states + row.in_flight
        assert base + act.fixed + act.per_sample * row.max_micro_batch <= cluster.usable
        assert base + act.fixed + act.per_sample * (row.max_micro_batch + 1) > cluster.usable
        assert row.ema > 0
    ddp = next(r for r in plan.rows if r.strategy == "DDP")
    assert plan.pick == "DDP" and ddp.fits


def test_cli_picks_a_sharded_strategy_when_ddp_does_not_fit_and_says_when_nothing_does(tmp_path, capsys):
    def plan(gpu_memory: str) -> tuple[str, dict]:
        out = tmp_path / f"{gpu_memory}.json"
        main(
            ["plan", "classification", "--config", str(REPO / DIGITS), "--output-dir", str(tmp_path)]
            + ["--nodes", "2", "--gpus-per-node", "4", "--gpu-memory", gpu_memory, "--json", str(out)]
        )
        return capsys.readouterr().out, json.loads(out.read_text())

    # resnet18 at 32 px: DDP holds 16 bytes per parameter (~180 MB), ZeRO-3 on 8 ranks a fraction.
    _, roomy = plan("80GiB")
    assert roomy["pick"] == "DDP"
    rows = {r["strategy"]: r for r in roomy["rows"]}
    ddp_need, zero3_need = rows["DDP"]["total"], rows["ZeRO-3"]["total"]
    assert zero3_need < ddp_need
    between = (ddp_need + zero3_need) / 2 / 0.9 + GiB  # usable = 0.9 x (memory - 1 GiB reserve)
    printed, tight = plan(f"{between / 2**20:.0f}MiB")
    assert tight["pick"] not in (None, "DDP"), printed
    assert f"pick: {tight['pick']}" in printed
    printed, none = plan("1GiB")
    assert none["pick"] is None
    assert "none fits" in printed and "grad_checkpointing" in printed


def test_cli_rejects_a_bad_memory_size_and_an_unknown_key(tmp_path, capsys):
    base = ["plan", "classification", "--config", str(REPO / DIGITS), "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit:
        main([*base, "--gpu-memory", "lots"])
    assert exit.value.code == 2 and "'lots' is not a memory size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main([*base, "--optim.lrr", "1"])
    assert exit.value.code == 2 and "optim.lrr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [("80GiB", 80 * GiB), ("80GB", 80 * GiB), ("40960MiB", 40 * GiB), ("1.5T", int(1.5 * 2**40))]
)
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_a_model_without_16_bit_cpu_kernels_is_measured_as_the_trainer_runs_it(tmp_path):
    """torchvision's detectors call NMS, which has no bf16 kernel on CPU: the trainer runs their
    steps under autocast over DeepSpeed's bf16 weights, and the plan measures them that way."""
    from recipes.detection.task import DetectionConfig, DetectionTask

    argv = ["--config", str(REPO / "recipes/detection/configs/shapes.yaml"), "--output-dir", str(tmp_path)]
    argv += ["--data.root", str(tmp_path / "data"), "--data.shapes_count", "[8, 4]", "--loop.precision", "bf16"]
    cfg = parse_args(DetectionConfig, argv)
    task = DetectionTask(cfg)
    assert task.autocast_half_weights
    plan = make_plan("detection", cfg, task, Cluster(1, 2, 24 * GiB))
    assert set(plan.activations) == {"autocast", "half"}
    assert all(n > 0 for act in plan.activations.values() for n in act.measured.values())
    for row in plan.rows:
        assert row.activations == plan.activations[compute_mode(row.strategy, "bf16")].at(cfg.data.micro_batch_size)
