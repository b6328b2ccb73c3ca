"""accelerate's trackers behind logging.trackers, read back with each library's own tools: a 2-rank
run that resumes once must be one tracker run with every step once, its config and final metrics."""

from __future__ import annotations

import json

from tests.helpers import TINY_VIT, launch


def test_tensorboard_mlflow_and_wandb_get_one_run_across_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_VIT, "--logging.count_flops", "false", "--output-dir", str(run_dir), "--logging.every_steps", "1"]
    args += ["--logging.trackers", "[tensorboard, mlflow, wandb]", "--checkpoint.every_steps", "2"]
    launch([*args, "--loop.max_steps", "2"], launcher="torchrun")
    launch([*args, "--loop.max_steps", "4", "--resume", "auto"], launcher="torchrun")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("shardvision").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    run = runs[0]
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["model.name"] == "test_vit"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/top1")] == [2, 4]
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert run.data.metrics["final/top1"] == final["top1"]

    # W&B offline: one run id, a folder per launch (`wandb sync` uploads them as one run); its
    # records are binary (written by W&B's Go core, no Python reader), so only the names are checked.
    wandb_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    launches = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(launches) == 2, list((run_dir / "wandb").iterdir())
    records = b"".join(p.read_bytes() for d in launches for p in d.glob("run-*.wandb"))
    assert all(name in records for name in (b"train/loss", b"eval/top1", b"final/top1", b"optim.lr"))

    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) >= 1
