"""Checkpoint publication, retention, damage detection and restore (one process, real accelerate)."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest
import torch
from accelerate import Accelerator

from core.checkpoint.background_save import host_copy
from core.checkpoint.files import published_checkpoints, verify
from core.checkpoint.per_parameter import PerParameterState, optimizer_order
from core.checkpoint.resume import CheckpointResumer, remap_position
from core.checkpoint.saver import CheckpointSaver
from core.checkpoint.state import TrainerState
from core.errors import CheckpointError, PerParameterStateError


@pytest.fixture
def setup(fresh_accelerate_state, tmp_path):
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    saver = CheckpointSaver(acc, str(tmp_path / "checkpoints"), keep_last=2)
    return acc, model, optimizer, saver


def resumer_of(saver):
    return CheckpointResumer(saver.accelerator, saver.root, saver.higher_is_better)


def resume(saver, path, state, model, optimizer):
    """As the trainer resumes: how to restore `path` here, the load, and the saver told."""
    resumer = resumer_of(saver)
    resumer.load(resumer.source_of(path, allow_pickle=False), state, model, optimizer)
    saver.resumed_at(state.global_step)


def train_step(model, optimizer):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_publishes_complete_folders_and_keeps_the_last_k(setup):
    acc, model, optimizer, saver = setup
    for step in (1, 2, 3):
        train_step(model, optimizer)
        saver.save(TrainerState(global_step=step, epoch=0, batches_in_epoch=step))
    assert [s for s, _ in published_checkpoints(saver.root)] == [2, 3]
    saver.wait_for_pruning()  # step 1 is unpublished at once, deleted in the background
    names = os.listdir(saver.root)
    assert sorted(names) == ["2", "3"], names  # no .tmp-* left behind
    newest = os.path.join(saver.root, "3")
    manifest = json.load(open(os.path.join(newest, "manifest.json")))["files"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(manifest)
    assert json.load(open(os.path.join(newest, "trainer_state.json")))["batches_in_epoch"] == 3


def test_partial_checkpoints_are_invisible_to_auto_resume(setup):
    acc, model, optimizer, saver = setup
    saver.save(TrainerState(global_step=3))
    os.makedirs(os.path.join(saver.root, ".tmp-4"))  # a save that crashed before publishing
    os.makedirs(os.path.join(saver.root, "5"))  # a folder without a manifest
    open(os.path.join(saver.root, "5", "model.safetensors"), "w").close()
    assert resumer_of(saver).resolve("auto") == os.path.join(saver.root, "3")
    assert resumer_of(saver).resolve(os.path.dirname(saver.root)) == os.path.join(saver.root, "3")  # a run folder
    assert CheckpointResumer(acc, os.path.join(saver.root, "none")).resolve("auto") is None
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        resumer_of(saver).resolve(os.path.join(saver.root, "5"))


def test_damaged_or_missing_files_are_named(setup):
    acc, model, optimizer, saver = setup
    path = saver.save(TrainerState(global_step=1)).path
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:  # same size, one byte flipped
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged \(its checksum differs"):
        resumer_of(saver).resolve(path)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors has {size // 2} bytes, manifest\.json says {size}"):
        verify(path)
    os.remove(weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is listed in manifest\.json but missing"):
        verify(path)


def test_auto_resume_falls_back_past_a_damaged_newest(setup, caplog):
    acc, model, optimizer, saver = setup
    saver.save(TrainerState(global_step=1))
    newest = saver.save(TrainerState(global_step=2)).path
    os.remove(os.path.join(newest, "optimizer.bin"))
    assert resumer_of(saver).resolve("auto") == os.path.join(saver.root, "1")
    assert "optimizer.bin is listed in manifest.json but missing" in caplog.text
    with pytest.raises(CheckpointError, match="optimizer.bin is listed"):
        resumer_of(saver).resolve(newest)  # an explicit path never falls back


def test_keep_best_keeps_the_best_and_never_the_newest_out(setup):
    """Ranked by the evaluation each checkpoint's own weights got, recorded after its save; one
    never evaluated (saved mid-epoch, or stopped during its evaluation) is not ranked."""
    acc, model, optimizer, saver = setup
    saver.keep_last, saver.keep_best = 1, 2
    for step, metric in ((1, 50.0), (2, 90.0), (3, 70.0), (4, None), (5, 80.0), (6, 10.0)):
        saver.save(TrainerState(global_step=step, eval_metric=95.0))  # the previous evaluation's: not this one's
        if metric is not None:
            saver.record_evaluation(step, metric, {"top1": metric})
    assert [s for s, _ in published_checkpoints(saver.root)] == [2, 5, 6]  # best two (90, 80) + the newest
    assert json.load(open(os.path.join(saver.root, "6", "evaluation.json")))["metrics"] == {"top1": 10.0}
    verify(os.path.join(saver.root, "6"))  # the checkpoint is still whole: its manifest does not list it


def test_a_resumed_run_knows_whether_its_checkpoints_evaluation_finished(setup):
    acc, model, optimizer, saver = setup
    saver.keep_best = 1
    due = TrainerState(global_step=3, evaluation_due=True, best_metric=60.0, best_step=1, layout="ddp")
    path = saver.save(due).path
    resumed = TrainerState(layout="ddp")
    resume(saver, path, resumed, model, optimizer)
    assert resumed.evaluation_due and resumed.best_step == 1  # stopped during it: evaluate again
    saver.record_evaluation(3, 70.0, {"top1": 70.0})
    resumed = TrainerState(layout="ddp")
    resume(saver, path, resumed, model, optimizer)
    assert not resumed.evaluation_due
    assert (resumed.eval_metric, resumed.best_metric, resumed.best_step) == (70.0, 70.0, 3)

    other_run = CheckpointSaver(acc, os.path.join(os.path.dirname(saver.root), "other-run"), keep_last=1)
    resume(other_run, path, TrainerState(layout="ddp"), model, optimizer)  # --resume PATH of this run's
    other_run.record_evaluation(3, 75.0, {"top1": 75.0})  # not its own checkpoint: left alone
    assert json.load(open(os.path.join(path, "evaluation.json")))["primary_metric"] == 70.0


def test_pickled_checkpoints_from_elsewhere_need_opt_in(setup, tmp_path):
    acc, model, optimizer, saver = setup
    foreign = tmp_path / "elsewhere" / "7"
    (foreign / "pytorch_model").mkdir(parents=True)
    (foreign / "trainer_state.json").write_text('{"global_step": 7, "world_size": 1}')
    with pytest.raises(
        CheckpointError, match=r"DeepSpeed checkpoint from outside this run's folder.*--checkpoint\.allow_pickle true"
    ):
        resumer_of(saver).source_of(str(foreign), allow_pickle=False)
    (foreign / "pytorch_model").rename(foreign / "pytorch_model_fsdp_0")
    (foreign / "trainer_state.json").write_text('{"global_step": 7, "world_size": 4}')
    with pytest.raises(CheckpointError, match=r"FSDP checkpoint from outside this run's folder"):
        resumer_of(saver).source_of(str(foreign), allow_pickle=False)
    # allowed: an FSDP checkpoint of 4 ranks is read parameter by parameter into this DDP run
    # (the runs themselves: tests/integration/test_fsdp.py)
    source = resumer_of(saver).source_of(str(foreign), allow_pickle=True)
    assert (source.saved_layout, source.how, source.state_folder) == ("fsdp", "per_parameter", str(foreign))


def test_a_checkpoint_of_another_optimizer_is_refused_naming_both(setup, tmp_path):
    acc, model, optimizer, saver = setup
    path = saver.save(TrainerState(global_step=1, optimizer="SGD", layout="ddp")).path
    with pytest.raises(CheckpointError, match=r"saved with the SGD optimizer and this run uses AdamW.*--optim\.name"):
        resume(saver, path, TrainerState(optimizer="AdamW", layout="ddp"), model, optimizer)


def test_position_carries_over_to_another_geometry(setup):
    acc, model, optimizer, saver = setup
    state = TrainerState(epoch=1, batches_in_epoch=7, world_size=2, micro_batch_size=64, grad_accum_steps=1)
    remap_position(state, world_size=1, micro_batch_size=128, grad_accum_steps=1)
    assert state.batches_in_epoch == 7 and state.world_size == 1  # 7 x 64 x 2 = 7 x 128 samples
    state = TrainerState(batches_in_epoch=7, world_size=1, micro_batch_size=32, grad_accum_steps=1)
    remap_position(state, world_size=2, micro_batch_size=32, grad_accum_steps=1)
    assert state.batches_in_epoch == 3  # 224 samples: 3 batches of 2 x 32 done, 32 samples seen again


def test_load_restores_weights_optimizer_and_position(setup):
    acc, model, optimizer, saver = setup
    train_step(model, optimizer)
    saved = TrainerState(epoch=2, batches_in_epoch=5, global_step=17, best_metric=91.5, best_step=11)
    path = saver.save(saved).path
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    train_step(model, optimizer)  # move away from the checkpoint
    state = TrainerState()
    resume(saver, path, state, model, optimizer)
    assert state == saved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moment)


def test_portable_state_of_a_changed_model_is_refused_naming_the_parameter(setup, tmp_path):
    acc, model, optimizer, saver = setup
    train_step(model, optimizer)
    path = saver.save(TrainerState(global_step=1)).path
    grown = torch.nn.Linear(4, 3)
    grown_optimizer = torch.optim.AdamW(grown.parameters(), lr=0.1)
    state = PerParameterState(path, optimizer_order(grown, grown_optimizer))
    assert state.step == 1.0
    with pytest.raises(PerParameterStateError, match=r"weight fp32 has \(2, 4\), this run's parameter \(3, 4\)"):
        state.load_into(acc, grown, grown_optimizer)


def test_host_copy_is_written_byte_for_byte_as_the_original(tmp_path):
    weight = torch.randn(6, 4)
    weight.tag = "set by a library"  # DeepSpeed sets attributes on its tensors
    state = OrderedDict(w=weight, row=weight[2], p=torch.nn.Parameter(torch.randn(3)), empty=torch.empty(0))
    state._metadata = {"": {"version": 1}}  # as nn.Module.state_dict() leaves it
    betas = (0.9, 0.999)
    original = {"model": state, "groups": [{"betas": betas}, {"betas": betas}], "shape": torch.Size([6, 4])}
    path = tmp_path / "state.pt"
    torch.save(original, path)
    expected = path.read_bytes()
    copy = host_copy(original)
    weight.add_(1.0)  # training goes on: the copy keeps the values it was taken with
    torch.save(copy, path)
    assert path.read_bytes() == expected


def test_an_asynchronous_save_writes_what_a_synchronous_one_does_at_that_step(setup, tmp_path):
    acc, model, optimizer, saver = setup
    train_step(model, optimizer)
    synchronous = saver.save(TrainerState(global_step=1)).path
    background = CheckpointSaver(acc, str(tmp_path / "async"), keep_last=2, async_save=True)
    saved = background.save(TrainerState(global_step=1))
    train_step(model, optimizer)  # while it is written
    background.wait()
    assert saved.background and saved.held_mb > 0
    published = saved.path
    verify(published)
    assert not [n for n in os.listdir(published) if n.startswith(".")]  # the ranks' markers are gone
    with open(os.path.join(synchronous, "manifest.json")) as a, open(os.path.join(published, "manifest.json")) as b:
        assert json.load(a) == json.load(b)  # every file, byte for byte
