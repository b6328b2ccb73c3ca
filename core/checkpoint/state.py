"""What a checkpoint records beside accelerate's model, optimizer and RNG files: the trainer's
position (`TrainerState`, in trainer_state.json), the evaluation of its own weights
(evaluation.json, added once that evaluation has finished), and which format its model state is
stored in (accelerate's safetensors, or DeepSpeed's and FSDP's pickled shards). Nothing of
shardvision's own is pickled: the state is JSON, the EMA weights safetensors (core/ema.py)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from core.errors import CheckpointError

TRAINER_STATE = "trainer_state.json"
EVALUATION = "evaluation.json"  # the evaluation of a checkpoint's own weights, added once it has finished
DEEPSPEED_TAG = "pytorch_model"  # the folder (DeepSpeed's checkpoint tag) accelerate saves ZeRO shards in
PICKLED_FORMATS = {DEEPSPEED_TAG: "DeepSpeed", "pytorch_model_fsdp_0": "FSDP"}


@dataclass
class TrainerState:
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on (per rank)
    global_step: int = 0  # optimizer steps taken since the start of the run
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss
    best_metric: float | None = None
    best_step: int | None = None
    eval_metric: float | None = None  # the primary metric of the latest evaluation
    # An epoch-end checkpoint is written before the epoch's evaluation, so that a stop during a long
    # evaluation loses nothing; a run resumed from it evaluates first, unless EVALUATION says it finished.
    evaluation_due: bool = False
    world_size: int = 1  # the geometry the position was recorded under
    micro_batch_size: int = 0
    grad_accum_steps: int = 1
    layout: str = ""  # how model and optimizer state are stored: ddp, zero1/2/3 or fsdp ("": saved before it was kept)
    optimizer: str = ""  # the optimizer's class name
    # A LoRA run's checkpoints hold what trains only: the frozen base's file, its sha256 and the
    # adapters' settings (core/lora.py base_reference), which a resume must match.
    lora_base: dict | None = None

    def note_evaluation(self, primary: float | None, higher_is_better: bool) -> None:
        """The evaluation at this step is done: its primary metric, and the best so far."""
        self.evaluation_due = False
        self.eval_metric = primary
        if primary is None:
            return
        if self.best_metric is None or (primary > self.best_metric if higher_is_better else primary < self.best_metric):
            self.best_metric, self.best_step = primary, self.global_step


def read_trainer_state(path: str) -> dict:
    """The trainer state checkpoint `path` recorded, as saved (fields of TrainerState only)."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        saved = json.load(f)
    unknown = set(saved) - {f.name for f in dataclasses.fields(TrainerState)}
    if unknown:
        raise CheckpointError(f"{path}/{TRAINER_STATE}: unknown fields {sorted(unknown)}")
    return saved


def evaluated_metric(path: str) -> float | None:
    """The primary metric of checkpoint `path`'s own evaluation, None if none finished."""
    try:
        with open(os.path.join(path, EVALUATION)) as f:
            return json.load(f)["primary_metric"]
    except FileNotFoundError:
        return None


def pickled_format(path: str) -> str | None:
    """'DeepSpeed' or 'FSDP' when the checkpoint's model state is stored as Python pickles."""
    return next((fmt for sub, fmt in PICKLED_FORMATS.items() if os.path.isdir(os.path.join(path, sub))), None)


def model_folder(folder: str) -> str:
    """Where a checkpoint keeps its model and optimizer state: DeepSpeed one level down, under its tag."""
    tagged = os.path.join(folder, DEEPSPEED_TAG)
    return tagged if os.path.isdir(tagged) else folder
