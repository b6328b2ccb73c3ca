"""The trainer in-process, on a tiny task: non-finite losses, EMA, export and eval-only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from core.config import TrainConfig
from core.distributed import reset_accelerator_state
from core.errors import NonFiniteLossError
from core.trainer import Trainer
from tests.builders import TinyTask, tiny_config
from tests.helpers import REPO, run_env


def test_nonfinite_loss_stops_with_the_step(fresh_accelerate_state, tmp_path):
    trainer = Trainer(tiny_config(tmp_path), TinyTask(None, nan_at=4))
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss \(nan\) at optimizer step 3 \(epoch 0, accumulation window ending at micro-batch 3\)",
    ):
        trainer.fit()


@pytest.mark.parametrize("nan_at, step, stopped_at", [(4, 3, 5), (8, 7, 8)])  # mid-epoch, and the epoch's last window
def test_nonfinite_loss_read_late_still_names_its_step_and_is_never_checkpointed(
    fresh_accelerate_state, tmp_path, nan_at, step, stopped_at
):
    """Between logging steps the agreement is read one optimizer step late (no host sync on
    the step just queued); the error must still name the window, before anything is saved."""
    cfg = tiny_config(tmp_path)
    cfg.loop.epochs, cfg.logging.every_steps, cfg.checkpoint.every_steps = 1, 100, 3
    trainer = Trainer(cfg, TinyTask(cfg, nan_at=nan_at))
    with pytest.raises(
        NonFiniteLossError,
        match=rf"at optimizer step {step} \(epoch 0, accumulation window ending at micro-batch {step}\)",
    ):
        trainer.fit()
    assert trainer.state.global_step == stopped_at  # read at the next step, or at the epoch's end
    saved = (
        [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
        if (tmp_path / "checkpoints").exists()
        else []
    )
    assert saved and all(s <= step for s in saved), saved  # none holds weights updated by the non-finite step


def test_nonfinite_loss_skip_drops_exactly_that_step(fresh_accelerate_state, tmp_path):
    cfg = tiny_config(tmp_path, nonfinite_loss="skip", grad_accum_steps=2)
    task = TinyTask(cfg, nan_at=3)  # the first micro-batch of the second window
    trainer = Trainer(cfg, task)
    trainer.fit()
    assert trainer.state.skipped_steps == 1
    assert trainer.state.global_step == 8  # 2 epochs x 4 windows: the skipped one still counts
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 3, 4, 5, 6, 7, 8]  # step 2 had no finite loss


def test_ema_is_exported_checkpointed_and_restored(fresh_accelerate_state, tmp_path):
    cfg = tiny_config(tmp_path, ema_decay=0.9)
    trainer = Trainer(cfg, TinyTask(cfg))
    metrics = trainer.fit()
    assert "ema_loss" in metrics
    final, ema = (
        load_file(tmp_path / "final" / "model.safetensors"),
        load_file(tmp_path / "final" / "model_ema.safetensors"),
    )
    assert final.keys() == ema.keys() and any(not torch.equal(final[k], ema[k]) for k in final)
    checkpoint = tmp_path / "checkpoints" / str(trainer.state.global_step)
    saved_ema = load_file(checkpoint / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in saved_ema.items())  # the last checkpoint is the end state

    reset_accelerator_state()
    cfg.checkpoint.resume = "auto"
    resumed = Trainer(cfg, TinyTask(cfg))
    assert all(torch.equal(v, resumed.ema.full.module.state_dict()[k]) for k, v in saved_ema.items())


def test_eval_only_evaluates_exported_weights(fresh_accelerate_state, tmp_path):
    cfg = tiny_config(tmp_path / "train")
    trained = Trainer(cfg, TinyTask(cfg)).fit()
    reset_accelerator_state()
    eval_cfg = tiny_config(tmp_path / "eval")
    eval_cfg.eval_only, eval_cfg.model.weights = True, str(tmp_path / "train" / "final" / "model.safetensors")
    evaluated = Trainer(eval_cfg, TinyTask(eval_cfg)).fit()
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert not os.path.exists(tmp_path / "eval" / "checkpoints")


@pytest.mark.parametrize(("every", "after_epochs"), [(1, [1, 2, 3, 4]), (3, [3, 4]), (0, [4])])
def test_evaluations_every_n_epochs_and_always_after_the_last(fresh_accelerate_state, tmp_path, every, after_epochs):
    cfg = tiny_config(tmp_path, epochs=4, eval_every_epochs=every)
    trainer = Trainer(cfg, TinyTask(cfg))
    trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [e * trainer.steps_per_epoch for e in after_epochs]


def test_known_failures_exit_with_their_code_and_one_line(fresh_accelerate_state, tmp_path, capsys):
    from core.entry import run

    base = [
        "--output-dir",
        str(tmp_path),
        "--data.micro_batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--logging.progress_bar",
        "false",
        "--logging.trackers",
        "[]",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run(TrainConfig, lambda cfg: TinyTask(cfg, nan_at=2), base)
    assert exit_info.value.code == 3
    assert capsys.readouterr().err.count("shardvision: error: non-finite loss (nan) at optimizer step 1") == 1
    reset_accelerator_state()
    with pytest.raises(SystemExit) as exit_info:
        run(TrainConfig, TinyTask, [*base, "--distributed.hang_timeout_minutes", "90"])
    assert exit_info.value.code == 2
    assert (
        "distributed.hang_timeout_minutes must be below distributed.timeout_minutes (60), got 90.0"
        in capsys.readouterr().err
    )


def test_the_progress_bar_counts_the_whole_run_and_a_resumed_run_starts_where_it_stopped(
    fresh_accelerate_state, tmp_path, capsys
):
    cfg = tiny_config(tmp_path)
    cfg.logging.progress_bar, cfg.checkpoint.every_steps, cfg.loop.max_steps = True, 3, 5
    trainer = Trainer(cfg, TinyTask(cfg))
    trainer.fit()
    total = trainer.total_steps
    shown = capsys.readouterr().err
    assert re.search(rf"run: +0%\|.*\| 0/{total} ", shown) and re.search(rf"run: .*\| {total}/{total} ", shown)
    assert re.search(r"epoch 0: ", shown) and "img_s=" in shown

    reset_accelerator_state()
    for step in os.listdir(tmp_path / "checkpoints"):  # the run stopped after step 3
        if step.isdigit() and int(step) > 3:
            shutil.rmtree(tmp_path / "checkpoints" / step)
    cfg.checkpoint.resume = "auto"
    Trainer(cfg, TinyTask(cfg)).fit()
    shown = capsys.readouterr().err
    assert re.search(rf"run: +\d+%\|.*\| 3/{total} ", shown) and re.search(rf"run: .*\| {total}/{total} ", shown)
    assert not re.search(rf"run: .*\| [012]/{total} ", shown), shown


class SlicedParameterModel(torch.nn.Module):
    """Hands a slice of its own parameter to a submodule, as Deformable DETR does with its query
    embeddings: torch's FlopCounterMode fails on it."""

    def __init__(self):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(3, 4))
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x) + self.head(self.queries[:1])  # the view is a submodule's input


class SlicedParameterTask(TinyTask):
    def build_model(self):
        return SlicedParameterModel()


def test_a_model_flopcounter_cannot_trace_trains_without_mfu(fresh_accelerate_state, tmp_path, capfd):
    cfg = tiny_config(tmp_path, epochs=1)
    trainer = Trainer(cfg, SlicedParameterTask(cfg))
    trainer.fit()
    assert trainer.flops_per_sample is None
    log = capfd.readouterr().err
    assert "model FLOPs not counted" in log and "--logging.count_flops false skips the count" in log
    assert (tmp_path / "final" / "model.safetensors").is_file()


BUILT_NOT_FITTED = """
import sys, time
from core.trainer import Trainer
from tests.builders import TinyTask, tiny_config

cfg = tiny_config(sys.argv[1])
cfg.distributed.startup_timeout_minutes = 0.005  # 0.3 s, watched every 0.2 s
trainer = Trainer(cfg, TinyTask(cfg))
time.sleep(3)  # the caller's time: ten times the limit
print("alive after 3 s", flush=True)
trainer.watchdog.resume()  # what fit() does: the limit applies again
time.sleep(60)
"""


def test_a_trainer_built_and_not_fitted_is_not_killed_by_its_startup_limit(tmp_path):
    """Between Trainer() and fit() the time is the caller's (a notebook, a test): the watchdog
    once killed a pytest worker 30 min after a test built a trainer it never fitted."""
    proc = subprocess.run(
        [sys.executable, "-c", BUILT_NOT_FITTED, str(tmp_path)],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "alive after 3 s" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 124 and "in phase 'startup'" in proc.stderr, proc.stderr[-3000:]  # re-armed by fit
