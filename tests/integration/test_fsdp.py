"""FSDP2 on two gloo CPU ranks, launched with the repo's accelerate_configs/fsdp.yaml as a user
would: it trains like DDP (losses, weights and their average held to the uninterrupted 2-rank DDP
run of the same seed and global batch), a run SIGKILLed while a background save writes resumes
from the previous checkpoint bit for bit, its checkpoints resume on another number of ranks (DCP
reshards) and under DDP or ZeRO-3 and back, with the optimizer state kept, and `shardvision
export` consolidates them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    ELASTIC,
    accelerate_config,
    assert_follows_ddp,
    assert_resumed_exactly,
    elastic_launch,
    last_launch,
    launch,
    read_metrics,
    run_killed_after_checkpoint,
    run_killed_when,
)


@pytest.fixture(scope="session")
def configs(zero_configs) -> dict[str, str]:
    return {**zero_configs, "fsdp": accelerate_config("fsdp.yaml")}


@pytest.fixture(scope="session")
def fsdp_reference(uninterrupted, configs) -> Path:
    """The uninterrupted 2-rank FSDP2 run of ELASTIC."""
    run_dir = uninterrupted(**elastic_launch(ELASTIC, "fsdp", 2, configs))
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"]) == (2, "fsdp")
    return run_dir


def stopped_at_step_4(run_dir: Path, layout: str, nproc: int, configs: dict[str, str], reference: Path | None) -> Path:
    """A run of `layout` on `nproc` ranks that stopped after its checkpoint at step 4: the
    reference's own checkpoint when there is one, else a run SIGKILLed once it is written."""
    if reference is not None:
        shutil.copytree(reference / "checkpoints" / "4", run_dir / "checkpoints" / "4")
    else:
        first = elastic_launch([*ELASTIC, "--output-dir", str(run_dir)], layout, nproc, configs)
        run_killed_after_checkpoint(first.pop("args"), run_dir, step=4, **first)
    return run_dir / "checkpoints" / "4"


def resumed(run_dir: Path, layout: str, nproc: int, configs: dict[str, str]) -> str:
    go_on = elastic_launch([*ELASTIC, "--output-dir", str(run_dir), "--resume", "auto"], layout, nproc, configs)
    return launch(go_on.pop("args"), **go_on).stderr


def test_fsdp_trains_like_ddp_and_exports_whole_weights_and_average(elastic_reference, fsdp_reference, tmp_path):
    """Every loss, the final weights and their average (kept on each rank's shards) equal DDP's to
    float noise; `shardvision export` of the last sharded checkpoint gives the run's own export."""
    assert_follows_ddp(elastic_reference("ddp"), fsdp_reference)
    out = tmp_path / "exported"
    checkpoint = fsdp_reference / "checkpoints" / "8"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded, one DCP file per rank
    launch(["export", str(checkpoint), str(out), "--allow-pickle"], launcher="module", script="core/commands/cli.py")
    for file in ("model.safetensors", "model_ema.safetensors"):
        exported, final = load_file(out / file), load_file(fsdp_reference / "final" / file)
        assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final), file


def test_fsdp_killed_while_a_background_save_writes_resumes_bit_for_bit_from_the_previous(
    fsdp_reference, configs, tmp_path
):
    """Checkpoints are written in the background (checkpoint.async_save, the default): the save
    thread runs DCP's save on a host copy of the shards. Rank 0 is SIGKILLed once that thread has
    begun writing step 8's shards: step 8 is never published, and the run resumes from step 4 and
    ends exactly as the uninterrupted run, its weight average too."""
    run_dir = tmp_path / "run"
    first = elastic_launch([*ELASTIC, "--output-dir", str(run_dir)], "fsdp", 2, configs)
    writing = run_dir / "checkpoints" / ".tmp-8" / "pytorch_model_fsdp_0" / "__0_0.distcp"  # the thread's
    run_killed_when(first.pop("args"), writing, rank=0, **first)
    assert not (run_dir / "checkpoints" / "8").exists()
    assert [(row["step"], row["background"]) for row in read_metrics(run_dir, "checkpoint")][:1] == [(4, True)]
    resumed(run_dir, "fsdp", 2, configs)
    assert_resumed_exactly(run_dir, fsdp_reference, checkpoint=4)
    ema, expected = (load_file(run / "final" / "model_ema.safetensors") for run in (run_dir, fsdp_reference))
    assert all(torch.equal(ema[k], expected[k]) for k in expected)


def test_background_and_synchronous_fsdp_saves_write_the_same_shards(fsdp_reference, configs, tmp_path):
    """The reference saved in the background (the default); the same run saving synchronously
    writes every DCP shard file, and the EMA's, byte for byte the same (a held copy once wrote
    one parameter's shard in another's place, which only an export or this comparison showed)."""
    run_dir = tmp_path / "sync"
    sync = elastic_launch(
        [*ELASTIC, "--output-dir", str(run_dir), "--checkpoint.async_save", "false"], "fsdp", 2, configs
    )
    launch(sync.pop("args"), **sync)
    assert {row["background"] for row in read_metrics(run_dir, "checkpoint")} == {False}
    assert {row["background"] for row in read_metrics(fsdp_reference, "checkpoint")} == {True}
    for step in ("4", "8"):
        files = sorted(
            p.relative_to(run_dir / "checkpoints" / step)
            for p in (run_dir / "checkpoints" / step).rglob("*")
            if p.suffix in (".distcp", ".safetensors")
        )
        assert len(files) == 6, files  # model and optimizer shards, EMA files: one per rank each
        for file in files:
            written = (fsdp_reference / "checkpoints" / step / file).read_bytes()
            assert written == (run_dir / "checkpoints" / step / file).read_bytes(), f"{step}/{file}"


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)], ids=["2-to-1-ranks", "1-to-2-ranks"])
def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(
    elastic_reference, fsdp_reference, configs, tmp_path, before, after
):
    run_dir = tmp_path / "run"
    original = stopped_at_step_4(run_dir, "fsdp", before, configs, fsdp_reference if before == 2 else None)
    resumed(run_dir, "fsdp", after, configs)
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"], run["resumed_from"]) == (after, "fsdp", str(original))
    assert_follows_ddp(elastic_reference("ddp"), run_dir)


@pytest.mark.parametrize(
    "saved, resumed_under", [("fsdp", "ddp"), ("zero3", "fsdp")], ids=["fsdp-to-ddp", "zero3-to-fsdp"]
)
def test_checkpoint_crosses_between_fsdp_and_other_strategies_with_its_optimizer_state(
    elastic_reference, fsdp_reference, configs, tmp_path, saved, resumed_under
):
    """Held to DDP at every later step: a reset optimizer (Adam's moments and step from zero) moves
    the loss by far more than the tolerance within one step."""
    run_dir = tmp_path / "run"
    reference = fsdp_reference if saved == "fsdp" else elastic_reference(saved)
    original = stopped_at_step_4(run_dir, saved, 2, configs, reference)
    log = resumed(run_dir, resumed_under, 2, configs)
    assert f"loaded the {saved} state of {original} into {resumed_under}, parameter by parameter" in log
    assert last_launch(run_dir)["resumed_from"] == str(original)
    assert_follows_ddp(elastic_reference("ddp"), run_dir)


def test_segmentation_recipe_with_batchnorm_trains_under_fsdp_like_ddp(tmp_path):
    """The segmentation recipe (transformers SegFormer: LayerNorm, and BatchNorm in its decode head;
    its get_input_embeddings raises, which accelerate's FSDP2 preparation calls) under
    accelerate's FSDP2 on CPU, against DDP for the same seed: BatchNorm's statistics are not
    sharded, and every rank takes rank 0's after each step, as DDP's broadcast does before each
    forward, so the losses, weights and statistics agree. Its export loads into the recipe's model."""
    from recipes.segmentation.task import SegmentationConfig, SegmentationTask
    from tests.helpers import QUICK, assert_export_is_whole, train_losses

    config = ["--config", "recipes/segmentation/configs/shapes.yaml"]
    args = [*config, *QUICK, "--loop.max_steps", "3", "--logging.every_steps", "1", "--logging.count_flops", "false"]
    seg = "recipes/segmentation/train.py"
    launch([*args, "--output-dir", str(tmp_path / "ddp")], script=seg)
    launch(
        [*args, "--output-dir", str(tmp_path / "fsdp")],
        launcher="accelerate",
        accelerate_config=accelerate_config("fsdp.yaml"),
        script=seg,
    )
    assert last_launch(tmp_path / "fsdp")["strategy"] == "fsdp"
    ddp, fsdp = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3] and all(fsdp[s] == pytest.approx(ddp[s], rel=1e-5) for s in fsdp), (ddp, fsdp)
    expected, got = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("ddp", "fsdp"))
    assert expected.keys() == got.keys() and any("running_mean" in k for k in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert_export_is_whole(
        tmp_path / "fsdp" / "final" / "model.safetensors", SegmentationConfig, SegmentationTask, config
    )


def test_hybrid_sharding_on_two_nodes_killed_and_resumed_follows_ddp(elastic_reference, tmp_path):
    """HSDP (distributed.fsdp_hybrid): two "nodes" of two ranks (torchrun --nnodes 2, one launcher
    per node, as on two hosts), each node sharding the model over its ranks and the nodes holding
    replicas; node 1 SIGKILLed after the checkpoint at step 4, both relaunched with --resume auto.
    Every loss and the final weights and average follow the single-host 2-rank DDP run."""
    import sys

    from tests.helpers import ELASTIC_MICRO, free_port
    from tests.integration.test_multi_node import resume_nodes, run_killing_node_1_after

    run_dir, port = tmp_path / "run", str(free_port())
    args = [*ELASTIC, "--data.micro_batch_size", ELASTIC_MICRO[4], "--output-dir", str(run_dir)]
    args += ["--distributed.strategy", "fsdp", "--distributed.fsdp_hybrid", "true"]
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node)]
        + [
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "recipes/classification/train.py",
        ]
        + args
        for node in range(2)
    ]
    run_killing_node_1_after(commands, tmp_path, run_dir / "checkpoints" / "4" / "manifest.json")
    resume_nodes(commands, tmp_path)
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"], run["resumed_from"]) == (4, "fsdp", str(run_dir / "checkpoints" / "4"))
    assert "mesh dp_replicate 2 x dp_shard 2" in (tmp_path / "resumed-node0.log").read_text()
    assert_follows_ddp(elastic_reference("ddp"), run_dir)
