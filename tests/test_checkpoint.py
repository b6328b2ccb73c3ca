"""Checkpoint publication, retention, damage detection and restore (one process, real accelerate)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate import Accelerator

from core.checkpoint import CheckpointError, CheckpointManager, TrainerState


@pytest.fixture
def setup(fresh_accelerate_state, tmp_path):
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    manager = CheckpointManager(acc, str(tmp_path / "checkpoints"), keep_last=2)
    return acc, model, optimizer, manager


def train_step(model, optimizer):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_publishes_complete_folders_and_keeps_the_last_k(setup):
    acc, model, optimizer, manager = setup
    for step in (1, 2, 3):
        train_step(model, optimizer)
        manager.save(TrainerState(global_step=step, epoch=0, batches_in_epoch=step))
    assert [s for s, _ in manager.complete()] == [2, 3]
    names = os.listdir(manager.root)
    assert sorted(names) == ["2", "3"], names  # no .tmp-* left behind
    newest = os.path.join(manager.root, "3")
    manifest = json.load(open(os.path.join(newest, "manifest.json")))["files"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(manifest)
    assert json.load(open(os.path.join(newest, "trainer_state.json")))["batches_in_epoch"] == 3


def test_partial_checkpoints_are_invisible_to_auto_resume(setup):
    acc, model, optimizer, manager = setup
    manager.save(TrainerState(global_step=3))
    os.makedirs(os.path.join(manager.root, ".tmp-4"))  # a save that crashed before publishing
    os.makedirs(os.path.join(manager.root, "5"))  # a folder without a manifest
    open(os.path.join(manager.root, "5", "model.safetensors"), "w").close()
    assert manager.resolve("auto") == os.path.join(manager.root, "3")
    assert manager.resolve(os.path.dirname(manager.root)) == os.path.join(manager.root, "3")  # a run folder
    assert CheckpointManager(acc, os.path.join(manager.root, "none"), 1).resolve("auto") is None
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        manager.load(os.path.join(manager.root, "5"), TrainerState())


def test_damaged_or_missing_files_are_named(setup):
    acc, model, optimizer, manager = setup
    path = manager.save(TrainerState(global_step=1))
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors has {size // 2} bytes, manifest\.json says {size}"):
        manager.load(path, TrainerState())
    os.remove(weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is listed in manifest\.json but missing"):
        manager.load(path, TrainerState())


def test_load_restores_weights_optimizer_and_position(setup):
    acc, model, optimizer, manager = setup
    train_step(model, optimizer)
    saved = TrainerState(epoch=2, batches_in_epoch=5, global_step=17, best_metric=91.5, best_step=11)
    path = manager.save(saved)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    train_step(model, optimizer)  # move away from the checkpoint
    state = TrainerState()
    manager.load(path, state)
    assert state == saved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moment)


def test_mid_epoch_checkpoint_on_another_world_size_is_refused(setup):
    acc, model, optimizer, manager = setup
    path = manager.save(TrainerState(global_step=4, batches_in_epoch=4, world_size=2))
    with pytest.raises(CheckpointError, match="saved mid-epoch by 2 ranks; resuming it on 1 ranks"):
        manager.load(path, TrainerState())
