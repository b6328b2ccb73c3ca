"""The training loop, once for every task and every strategy.

`Trainer(cfg, task).fit()` builds the Accelerator, the model, data, optimizer and schedule,
resumes if asked, then alternates `train_one_epoch` and `evaluate`, saving checkpoints and
finally exporting consolidated weights. The loop never knows how the model is parallelised: DDP,
DeepSpeed ZeRO and FSDP differ only in the Accelerator that core/distributed.py builds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from accelerate.utils import send_to_device

from core.checkpoint.export import save_whole_weights
from core.checkpoint.files import check_shared
from core.checkpoint.per_parameter import optimizer_order
from core.checkpoint.resume import CheckpointResumer
from core.checkpoint.saver import CheckpointSaver
from core.checkpoint.state import TrainerState
from core.config import TrainConfig
from core.config_parsing import save_config, to_dict
from core.data import BadSamples, GuardedCollate, GuardedSamples, build_loader
from core.distributed import (
    bare_module,
    build_accelerator,
    choose_fsdp_units,
    layout_of,
    model_construction,
    reshard,
    seed_everything,
    seed_rank,
    setup_logging,
    share_buffers,
    strategy_of,
)
from core.ema import WeightAverage
from core.errors import ConfigError, Preempted
from core.host_memory import freed_memory_returned
from core.lora import apply_lora, base_reference, export_lora, lora_enabled
from core.model_options import HALF_DTYPES, apply_model_options, cast_inputs
from core.optim import (
    build_optimizer,
    build_scheduler,
    optimizer_kind,
    param_group_facts,
    set_schedule_step,
)
from core.run_log import (
    RunLogger,
    RunProgress,
    TrainMeter,
    memory_mb,
    peak_tflops,
)
from core.run_summary import count_flops, log_run_summary, report_startup_memory
from core.shards import epoch_order
from core.step_agreement import StepAgreement
from core.task import Task
from core.watchdog import HangWatchdog, watched
from core.weights import allocate_for_sharded_load, load_weights

logger = logging.getLogger("shardvision")


class Trainer:
    def __init__(self, cfg: TrainConfig, task: Task):
        self.cfg, self.task = cfg, task
        # Started before the rendezvous, which is the first thing that can hang; the launcher's RANK
        # names the file, as no process group exists yet.
        d = cfg.distributed
        self.watchdog = HangWatchdog(
            cfg.output_dir, int(os.environ.get("RANK", "0")), d.hang_timeout_minutes, d.startup_timeout_minutes
        )
        try:
            with freed_memory_returned():
                self._build(cfg, task)
        except BaseException:
            self.watchdog.stop()
            raise
        self.watchdog.pause()  # until fit(): a trainer built and never fitted (a notebook, a test) lives on

    def _build(self, cfg: TrainConfig, task: Task) -> None:
        """The run's parts in the order each needs the last: processes, checkpoints (a resume is
        decided before the engine exists), model, data, optimization, then the resumed position."""
        self.accelerator = acc = build_accelerator(cfg)
        setup_logging(acc)
        self.strategy, self.layout = strategy_of(acc), layout_of(acc)
        task.check_strategy(self.strategy, cfg.loop.precision, acc.device)
        if acc.is_main_process:
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        resumer = self._build_checkpointing(cfg, task)
        model = self._build_model(cfg, task)
        train_loader, eval_loader = self._build_data(cfg, task)
        order = self._build_optimization(cfg, model, train_loader, eval_loader)
        # Counted before a resume restores the random streams, whatever the count draws from them.
        self.flops_per_sample = self._count_flops() if cfg.logging.count_flops else None
        self.peak_tflops = peak_tflops(acc.device, cfg.logging.peak_tflops)
        self.state = TrainerState(
            world_size=acc.num_processes,
            micro_batch_size=cfg.data.micro_batch_size,
            grad_accum_steps=cfg.loop.grad_accum_steps,
            layout=self.layout,
            optimizer=optimizer_kind(self.optimizer)[0],
            lora_base=base_reference(cfg.model, acc),
        )
        if self.resume_source is not None:
            resumer.load(self.resume_source, self.state, self.model, self.optimizer, self.ema, order)
            self.checkpoints.resumed_at(self.state.global_step)
            set_schedule_step(self.scheduler, self.state.global_step)
        elif cfg.checkpoint.resume == "auto":
            logger.info("--resume auto: no complete checkpoint in %s, starting fresh", self.checkpoints.root)
        self.run_logger = RunLogger(acc, cfg.output_dir, to_dict(cfg), cfg.logging)
        self.startup_reported = False  # each rank's peak memory is reported once, after its first step
        self.agreement = StepAgreement(acc, cfg.loop.nonfinite_loss, self.bad_samples)
        self.meter = TrainMeter(acc, cfg.logging.every_steps)
        self.progress = RunProgress(acc, cfg.logging.progress_bar, self.total_steps, self.state.global_step)

    def _build_checkpointing(self, cfg: TrainConfig, task: Task) -> CheckpointResumer:
        """Where checkpoints go, and the one this run resumes from (None: starts fresh)."""
        acc = self.accelerator
        self.checkpoints = CheckpointSaver(
            acc,
            os.path.join(cfg.output_dir, "checkpoints"),
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_best,
            task.higher_is_better,
            cfg.checkpoint.every_steps,
            cfg.checkpoint.at_epoch_end,
            self.watchdog,
            async_save=cfg.checkpoint.async_save,
            only_trainable=lora_enabled(cfg.model),
        )
        check_shared(acc, self.checkpoints.root)  # before any work that a checkpoint could not keep
        # Before the engine exists: a ZeRO checkpoint of another world size or strategy is loaded in
        # DeepSpeed's universal form, which its config must announce.
        resumer = CheckpointResumer(acc, self.checkpoints.root, task.higher_is_better)
        resumed_from = resumer.resolve(cfg.checkpoint.resume)
        self.resume_source = (
            None if resumed_from is None else resumer.source_of(resumed_from, cfg.checkpoint.allow_pickle)
        )
        return resumer

    def _build_model(self, cfg: TrainConfig, task: Task) -> torch.nn.Module:
        """Same seed on every rank for the weights (ZeRO-3 and FSDP2 shard whatever each rank
        built), then a per-rank stream for dropout and mixup. Fine-tuning under ZeRO-3 or FSDP2
        builds the model partitioned and streams the weights into it: no rank holds the whole
        model. (Not from scratch: timm initialises layers after building them, which a partitioned
        build skips.) FSDP2's weights are streamed in after accelerate's prepare has sharded it."""
        seed_everything(cfg.seed)
        # FSDP2's meta-device start would need LoRA's names in its sharded load: a LoRA run starts whole.
        sharded_start = ("zero3",) if lora_enabled(cfg.model) else ("zero3", "fsdp")
        self.partitioned = self.layout in sharded_start and bool(cfg.model.weights)
        with model_construction(self.accelerator, self.partitioned):
            model = task.build_model()
        if self.partitioned and self.layout == "fsdp" and cfg.model.weights:
            allocate_for_sharded_load(model, cfg.model.weights, cfg.model.weights_exclude)
        elif cfg.model.weights:
            load_weights(model, cfg.model.weights, cfg.model.weights_exclude)
        if self.layout == "zero3" and self.partitioned:
            logger.info("ZeRO-3: model built partitioned (DeepSpeed zero.Init), %s streamed into it", cfg.model.weights)
        if lora_enabled(cfg.model):
            apply_lora(model, cfg.model, cfg.seed)
        apply_model_options(model, cfg)
        seed_rank(cfg.seed, self.accelerator.process_index)
        return model

    def _build_data(self, cfg: TrainConfig, task: Task) -> tuple[Any, Any]:
        """The data sets behind their bad-sample guard, and their (not yet prepared) loaders.
        Generated data sets (the demos) are written once per machine, by its first rank; several
        machines on one shared filesystem race safely (core/data.py folder_written_once)."""
        acc = self.accelerator
        with acc.local_main_process_first():
            train_set, eval_set = task.build_datasets()
        self.train_set, self.eval_set = GuardedSamples(train_set, "train"), GuardedSamples(eval_set, "eval")
        self.collate = GuardedCollate(task.collate)
        self.bad_samples = BadSamples(acc, cfg.output_dir, cfg.data.bad_samples)
        self.bad_samples.add_found_at_start(self.train_set, self.eval_set)
        self.bad_samples.flush()
        loader_args: dict[str, Any] = dict(
            num_workers=cfg.data.num_workers, collate_fn=self.collate, pin_memory=cfg.data.pin_memory
        )
        train_loader = build_loader(
            self.train_set,
            batch_size=cfg.data.micro_batch_size,
            shuffle=True,
            drop_last=True,
            order=None if task.train_shards is None else epoch_order(task.train_shards, cfg, acc.num_processes),
            **loader_args,
        )
        eval_loader = build_loader(
            self.eval_set,
            batch_size=cfg.data.eval_micro_batch_size or cfg.data.micro_batch_size,
            shuffle=False,
            **loader_args,
        )
        return train_loader, eval_loader

    def _build_optimization(
        self, cfg: TrainConfig, model: torch.nn.Module, train_loader: Any, eval_loader: Any
    ) -> list[str]:
        """Optimizer, the wrapped model and loaders (accelerate's prepare), schedule, weight
        average and half-precision inputs. Returns the optimizer's parameter names in order,
        which name its state for a checkpoint of another strategy."""
        acc = self.accelerator
        optimizer = build_optimizer(model, cfg.optim, sharded=self.strategy == "fsdp")
        order = optimizer_order(model, optimizer)
        # Read before DeepSpeed replaces the groups' parameters with its flat partitions.
        self.param_groups = param_group_facts(optimizer)
        if self.strategy == "fsdp":
            units = choose_fsdp_units(acc.state.fsdp_plugin, model, cfg.distributed.fsdp_auto_wrap_classes)
            mesh = acc.state.device_mesh  # None on GPU without fsdp_hybrid: every rank shards
            logger.info(
                "FSDP2 units: %s and the whole model; mesh %s",
                ", ".join(units) or "only",
                " x ".join(f"{n} {s}" for n, s in zip(mesh.mesh_dim_names, mesh.shape, strict=True))
                if mesh
                else "flat",
            )
        self.model, self.optimizer, self.train_loader, self.eval_loader = acc.prepare(
            model, optimizer, train_loader, eval_loader
        )
        if self.partitioned and self.layout == "fsdp" and cfg.model.weights:
            load_weights(self.model, cfg.model.weights, cfg.model.weights_exclude)
            logger.info("FSDP2: model built on the meta device, sharded, %s streamed in", cfg.model.weights)
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"data.micro_batch_size={cfg.data.micro_batch_size} x {acc.num_processes} ranks is more than the "
                f"{len(self.train_set)} training samples: not one batch per epoch"
            )
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.loop.grad_accum_steps)
        self.total_steps = cfg.loop.epochs * self.steps_per_epoch
        if cfg.loop.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.loop.max_steps)
        # Built on the raw optimizer, not prepared: stepped once per optimizer step by us (see core/optim.py).
        self.scheduler = build_scheduler(optimizer, cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.ema = None if cfg.loop.ema_decay is None else WeightAverage(acc, self.model, cfg.loop.ema_decay)
        self.input_dtype = self._input_dtype()
        if self.input_dtype is not None:
            # DeepSpeed casts parameters but not buffers to bf16/fp16; norm statistics must follow
            # or batch_norm rejects the mix (on CPU).
            for buffer in self.model.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(self.input_dtype)
        return order

    # ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to the end (or evaluate only), export the weights, return the last eval metrics.
        SIGTERM, SIGUSR1 and SIGUSR2 end the run after the current optimizer step with a checkpoint (Preempted).
        However it ends, the trackers are closed and the process group is torn down here, not
        left to interpreter exit."""
        self.agreement.listen_for_stop_signals()
        self.watchdog.resume()
        try:
            metrics = self._run()
            self.watchdog.beat("shutdown", self.state.global_step)
            self.accelerator.wait_for_everyone()  # every rank has finished its work before any leaves
            return metrics
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        """End the run in order, whatever ended it, rather than leave it to interpreter exit (which
        a multi-rank process skips, see core/entry.py): checkpoint deletions, hang watch, loader
        workers, trackers, then the process group."""
        self.checkpoints.close()
        self.watchdog.stop()
        for loader in (self.train_loader, self.eval_loader):
            workers = getattr(loader, "_iterator", None)  # persistent workers live on the loader
            if workers is not None and hasattr(workers, "_shutdown_workers"):
                workers._shutdown_workers()
        self.progress.close()
        self.run_logger.close()

    def _run(self) -> dict[str, float]:
        log_run_summary(self)
        if self.cfg.eval_only:
            return self.evaluate_and_log()

        metrics: dict[str, float] = {}
        if self.cfg.loop.eval_at_start and self.state.global_step == 0:
            self.evaluate_and_log()
        if self.state.evaluation_due:  # resumed from an epoch's checkpoint whose evaluation did not finish
            metrics = self.evaluate_and_log()
        for epoch in range(self.state.epoch, self.cfg.loop.epochs):
            if self._reached_max_steps():  # resumed from the run's last checkpoint
                break
            self.train_one_epoch(epoch)
            last = self._last_epoch(epoch)
            self.state.evaluation_due = self._evaluates_after(epoch)
            # The epoch's checkpoint before its evaluation: a scheduler's grace period can run out
            # during a long evaluation, and the epoch must not be lost with it.
            self._save_if_due(epoch, epoch_end=True, force=last)
            if self.state.evaluation_due:
                metrics = self.evaluate_and_log()
            if last:
                break
        if not metrics:  # resumed from a finished run: nothing left to train
            metrics = self.evaluate_and_log()
        if self.cfg.checkpoint.export_final:
            self.export_final(metrics)
        return metrics

    def train_one_epoch(self, epoch: int) -> None:
        """One pass over the training set (what is left of it after a mid-epoch resume)."""
        acc, state, agreement = self.accelerator, self.state, self.agreement
        self.model.train()
        self.meter.restart()
        with self._epoch_batches(epoch) as batches:
            for batch, report in batches:
                agreement.note(self.bad_samples.take(report))
                if not self.train_step(batch, epoch):
                    continue  # inside an accumulation window
                self.progress.step_taken()
                self.watchdog.started()
                if not self.startup_reported:
                    self.startup_reported = report_startup_memory(acc, self.run_logger, state.global_step, epoch)
                logging_due = self.meter.due(state.global_step)
                if logging_due or self.checkpoints.due(state.global_step) or self._reached_max_steps():
                    agreement.settle()  # nothing is logged or saved before every rank's flags are read
                if logging_due:
                    self._log_train(epoch)
                if agreement.stop_requested:
                    self._stop(epoch, f"at step {state.global_step}")
                self._save_if_due(epoch)
                if self._reached_max_steps():
                    return
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        agreement.settle()  # a stop requested during the epoch's last step
        if agreement.stop_requested:
            state.evaluation_due = self._evaluates_after(epoch)  # the resumed run evaluates the epoch
            self._stop(epoch, f"at the end of epoch {epoch}")

    def _stop(self, epoch: int, where: str) -> NoReturn:
        """Every rank agreed to stop (a signal): the checkpoint of this step, then Preempted."""
        self._save_if_due(epoch, force=True)
        raise self.agreement.preempted(where).noted(self._saved_note())

    def _save_if_due(self, epoch: int, *, epoch_end: bool = False, force: bool = False) -> None:
        """A checkpoint if one is due (CheckpointSaver.maybe_save), with what it cost the loop."""
        saved = self.checkpoints.maybe_save(self.state, self.ema, epoch_end=epoch_end, force=force)
        if saved is not None:
            cost = {"stall_s": saved.stall_s, "held_mb": saved.held_mb, "background": saved.background}
            self.run_logger.log("checkpoint", self.state.global_step, epoch, cost, trackers=False)

    def train_step(self, batch: Any, epoch: int) -> bool:
        """Forward and backward one micro-batch. The one that closes an accumulation window (or the
        epoch) also settles with the other ranks whether the step is applied, then clips, steps and
        schedules; the others only add to .grad (and under DDP skip the all-reduce). True when an
        optimizer step was taken."""
        acc, meter = self.accelerator, self.meter
        batch = self.cast_inputs(batch)
        with acc.accumulate(self.model):
            with self.half_weights_autocast():
                loss = self.task.training_step(self.model, batch)
            meter.add(loss, self.task.batch_size(batch))
            closing = acc.sync_gradients
            apply = self.agreement.close_window(meter.window_loss, self._where(epoch)) if closing else True
            if apply:
                acc.backward(loss)  # divides by grad_accum_steps (DeepSpeed divides inside)
            self.state.batches_in_epoch += 1
            if closing:
                meter.close_window(apply, self._optimizer_step(apply))
                self.agreement.step_taken()
        return closing

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, tag: str = "") -> dict[str, float]:
        """Metrics over the whole eval set: each rank runs its shard, outputs are gathered with
        the padding accelerate adds to even out the last batch dropped, so every sample counts once.
        Files the metrics write go to <output_dir>/eval/step-<N><tag>/."""
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        metrics = self.task.build_metrics()
        # Evaluating must not move the training's random streams (the loader draws its seed from
        # them): a resumed run that evaluates again, or does not, then trains on identically.
        with _training_rng_kept(self.accelerator.device):
            batches = watched(self.eval_loader, self.watchdog, "evaluation", lambda: self.state.global_step)
            for done, (batch, report) in enumerate(batches):
                if self.agreement.stop_agreed():  # at the next batch, not after the whole evaluation
                    raise self.agreement.preempted(
                        f"during the evaluation at step {self.state.global_step}, "
                        f"after {done} of its {len(self.eval_loader)} batches"
                    )
                self._evaluate_batch(model, metrics, batch, report)
        model.train(was_training)
        reshard(model)
        self.bad_samples.flush()
        values = metrics.compute()
        table = metrics.table()
        if table:
            logger.info("per-class results\n%s", table)
        if self.accelerator.is_main_process:
            metrics.write(os.path.join(self.cfg.output_dir, "eval", f"step-{self.state.global_step}{tag}"), values)
        return values

    def _evaluate_batch(self, model: torch.nn.Module, metrics: Any, batch: Any, report: Any) -> None:
        """One evaluation batch: every rank's outputs gathered into `metrics`, bad samples left out."""
        self.bad_samples.take(report)
        batch = self.cast_inputs(batch)
        with self.accelerator.autocast(), self.half_weights_autocast():
            outputs = self.task.evaluation_step(model, batch)
        outputs = self.accelerator.gather_for_metrics(outputs)
        # Every rank sees every rank's flags, so all stop (or drop) together.
        ok = self.accelerator.gather_for_metrics(report.ok.to(self.accelerator.device)).cpu()
        if not ok.all():
            if not self.bad_samples.skip:
                raise self.bad_samples.error()
            outputs = _only(outputs, ok)  # a stand-in sample must not count twice
        metrics.update(outputs)
        self.watchdog.started()  # an eval-only run's startup ends with its first batch

    def evaluate_and_log(self) -> dict[str, float]:
        state = self.state
        try:
            metrics = self.evaluate()
            if self.ema is not None:
                with self.ema.swapped_in() as averaged:
                    metrics.update({f"ema_{k}": v for k, v in self.evaluate(averaged, tag="-ema").items()})
        except Preempted as stop:
            if self.cfg.eval_only:
                raise stop.noted("nothing to save in an evaluation-only run, run it again") from None
            self._save_if_due(state.epoch, force=True)  # no-op when the epoch's checkpoint is already written
            raise stop.noted(f"{self._saved_note()} (the resumed run evaluates again)") from None
        primary = metrics.get(self.task.primary_metric)
        if self.cfg.eval_only:
            state.eval_metric = primary
        else:
            state.note_evaluation(primary, self.task.higher_is_better)
            self.checkpoints.record_evaluation(state.global_step, primary, metrics)
        epoch = state.epoch + state.batches_in_epoch / max(1, len(self.train_loader))
        self.run_logger.log("eval", state.global_step, epoch, metrics)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)  # per-class values: in the table
        logger.info("eval step %d (epoch %.2f): %s", state.global_step, epoch, shown)
        return metrics

    def export_final(self, metrics: dict[str, float]) -> str:
        """Consolidated weights in `<output_dir>/final/model.safetensors`, whatever the strategy:
        gathered from ZeRO-3/FSDP shards on rank 0 (a collective, so every rank calls it)."""
        acc = self.accelerator
        self.watchdog.beat("export", self.state.global_step)
        final_dir = os.path.join(self.cfg.output_dir, "final")
        acc.wait_for_everyone()
        # DeepSpeed gathers ZeRO-3 shards through its engine; elsewhere the module itself is
        # saved, without torch.compile's wrapper (which prefixes every name with '_orig_mod.').
        if self.strategy == "deepspeed":
            whole = acc.get_state_dict(self.model)
        else:  # already unwrapped: accelerate's own unwrapping would import deepspeed (bare_module)
            whole = acc.get_state_dict(self.bare_model(), unwrap=False)
        if acc.is_main_process:
            os.makedirs(final_dir, exist_ok=True)
            if lora_enabled(self.cfg.model):  # the merged model, and the adapter beside it
                export_lora(whole, self.task.build_model, self.cfg.model, final_dir, save_whole_weights)
            else:
                save_whole_weights(whole, os.path.join(final_dir, "model.safetensors"))
        if self.ema is not None:
            self.ema.export(final_dir)
        if acc.is_main_process:
            self.task.write_model_folder(self.bare_model(), final_dir)
            save_config(self.cfg, os.path.join(final_dir, "config.yaml"))
            with open(os.path.join(final_dir, "metrics.json"), "w") as f:
                json.dump({"step": self.state.global_step, **metrics}, f, indent=2)
            logger.info("exported %s", os.path.join(final_dir, "model.safetensors"))
        self.run_logger.log("final", self.state.global_step, self.state.epoch, metrics)  # to the trackers too
        acc.wait_for_everyone()
        return final_dir

    # ------------------------------------------------------------------------------------------

    def _optimizer_step(self, window_ok: bool) -> torch.Tensor | None:
        """Close an accumulation window: clip, step, EMA (or drop the step), schedule. Returns the
        gradient norm when it was computed."""
        grad_norm = None
        if window_ok:
            grad_norm = self._clip_gradients()
            self.optimizer.step()
            if self.strategy in ("deepspeed", "fsdp"):  # neither keeps buffers in step across ranks as DDP does
                share_buffers(self.bare_model())
            if self.ema is not None:
                self.ema.update(self.model, step=self.state.global_step)
        else:
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # in lockstep with global_step, skipped steps included
        self.state.global_step += 1
        return grad_norm

    def _epoch_batches(self, epoch: int) -> Any:
        """This epoch's (batch, sample report) pairs in the order (seed, epoch) fixes, after a
        mid-epoch resume only those not yet trained on; watched for hangs, shown by the progress bar."""
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        done, loader = self.state.batches_in_epoch, self.train_loader
        if done:
            loader = self.accelerator.skip_first_batches(loader, done)
        batches = watched(loader, self.watchdog, "train step", lambda: self.state.global_step)
        return self.progress.epoch(batches, len(self.train_loader), done, f"epoch {epoch}")

    def _log_train(self, epoch: int) -> None:
        self.bad_samples.flush()
        measured = self.meter.read()
        images_per_sec = measured["images_per_sec"]
        lr, memory = float(self.scheduler.get_last_lr()[0]), memory_mb(self.accelerator.device)
        values = {"loss": measured["loss"], "lr": lr, "images_per_sec": images_per_sec, "memory_mb": memory}
        if self.bad_samples.skip:
            values["bad_samples"] = len(self.bad_samples.known)
        if self.flops_per_sample:
            values["tflops_per_device"] = images_per_sec * self.flops_per_sample / 1e12 / self.accelerator.num_processes
            if self.peak_tflops:
                values["mfu"] = values["tflops_per_device"] / self.peak_tflops
        if "grad_norm" in measured:
            values["grad_norm"] = measured["grad_norm"]
        self.run_logger.log(
            "train", self.state.global_step, epoch + self.state.batches_in_epoch / len(self.train_loader), values
        )
        self.progress.show(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}", img_s=f"{images_per_sec:.0f}")

    def _input_dtype(self) -> torch.dtype | None:
        """DeepSpeed casts the whole model to bf16/fp16, so inputs must follow; DDP autocasts."""
        return HALF_DTYPES.get(self.cfg.loop.precision) if self.strategy == "deepspeed" else None

    def half_weights_autocast(self) -> contextlib.AbstractContextManager:
        """DeepSpeed holds bf16/fp16 weights and does not autocast: a task whose model needs it
        (Task.autocast_half_weights) runs its steps under autocast there. Elsewhere nothing: DDP
        and FSDP autocast through accelerate."""
        if self.input_dtype is not None and self.task.autocast_half_weights:
            return torch.autocast(self.accelerator.device.type, dtype=self.input_dtype)
        return contextlib.nullcontext()

    def cast_inputs(self, batch: Any) -> Any:
        batch = self.task.on_device(batch)
        return cast_inputs(batch, self.task.input_keys, self.input_dtype, self.cfg.model.channels_last)

    def _count_flops(self) -> float | None:
        if len(self.eval_set) == 0:
            return None
        batch, _ = self.collate([self.eval_set[0]])
        if batch is None:
            return None
        batch = self.cast_inputs(send_to_device(batch, self.accelerator.device))
        try:
            return count_flops(self.bare_model(), self.task, batch, self.half_weights_autocast())
        finally:
            reshard(self.bare_model())

    def _clip_gradients(self) -> torch.Tensor | None:
        # DeepSpeed clips inside its own step, from "gradient_clipping" in its filled-in config.
        if self.cfg.loop.clip_grad_norm is None or self.strategy == "deepspeed":
            return None
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.loop.clip_grad_norm)

    def _where(self, epoch: int) -> str:
        return (
            f"optimizer step {self.state.global_step} (epoch {epoch}, accumulation window ending at "
            f"micro-batch {self.state.batches_in_epoch})"
        )

    def bare_model(self) -> torch.nn.Module:
        """The model without DDP's or torch.compile's wrappers (FSDP2 shards stay in place)."""
        return bare_module(self.accelerator, self.model)

    def _last_epoch(self, epoch: int) -> bool:
        return epoch + 1 == self.cfg.loop.epochs or self._reached_max_steps()

    def _evaluates_after(self, epoch: int) -> bool:
        every = self.cfg.loop.eval_every_epochs
        return self._last_epoch(epoch) or (every > 0 and (epoch + 1) % every == 0)

    def _saved_note(self) -> str:
        return f"checkpoint of step {self.state.global_step} saved, rerun with --resume auto"

    def _reached_max_steps(self) -> bool:
        return self.cfg.loop.max_steps is not None and self.state.global_step >= self.cfg.loop.max_steps


@contextlib.contextmanager
def _training_rng_kept(device: torch.device) -> Iterator[None]:
    """torch's random state (the host's and `device`'s) as it was before the block."""
    accelerators = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else "cuda"):
        yield


def _only(outputs: Any, keep: torch.Tensor) -> Any:
    """The gathered per-sample outputs (tensors batch-first, or a list) where `keep` is True."""
    if isinstance(outputs, dict):
        return {k: v[keep.to(v.device)] for k, v in outputs.items()}
    return [o for o, k in zip(outputs, keep.tolist(), strict=True) if k]
