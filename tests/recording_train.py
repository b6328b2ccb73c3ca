"""The classification recipe, launched as a user launches it, with one addition for tests: every
rank appends the dataset indices of each micro-batch it trains on to
`<output_dir>/samples-<RECORD_TAG>-rank<R>.jsonl` (RECORD_TAG from the environment, one per
launch), so a test can tell which samples each optimizer step saw."""

from __future__ import annotations

import json
import os

from core.entry import run
from recipes.classification.task import ClassificationConfig, ClassificationTask


class Indexed:
    """A data set whose samples also carry their index."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], "index": index}

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)


class RecordingTask(ClassificationTask):
    def build_datasets(self):
        train, val = super().build_datasets()
        return Indexed(train), val

    def training_step(self, model, batch):
        name = f"samples-{os.environ.get('RECORD_TAG', 'run')}-rank{os.environ.get('RANK', '0')}.jsonl"
        with open(os.path.join(self.cfg.output_dir, name), "a") as f:
            f.write(json.dumps(batch["index"].tolist()) + "\n")
        return super().training_step(model, batch)


if __name__ == "__main__":
    run(ClassificationConfig, RecordingTask)
