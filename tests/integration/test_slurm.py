"""The two SLURM paths, run on one machine.

`shardvision submit --cluster local`: a real submitit job (its LocalExecutor, 2 tasks = 2 ranks),
preempted the way SLURM preempts, by submitit's signal (SIGUSR2) to every task. The job must
checkpoint, requeue itself with --resume auto, resume and finish exactly where the uninterrupted
torchrun run of the same trajectory finishes.

`launchers/slurm.sbatch`: the batch script itself, with stand-ins for srun and scontrol
(tests/stand_ins/) that run the tasks here and record the requeue; SIGUSR1 to the script, as
`--signal=B:USR1@180` sends it before the time limit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.helpers import (
    CLASSIFY,
    REPO,
    TRAJECTORY,
    final_weights_equal,
    free_port,
    kill_tree,
    last_launch,
    logged_step,
    read_metrics,
    run_env,
    train_losses,
    wait_until,
)

SHARDVISION = str(Path(sys.executable).parent / "shardvision")


def saved_before_the_requeue(run_dir: Path) -> list[int]:
    """The steps the first launch saved: the checkpoint rows before metrics.jsonl's second run row."""
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    second = [i for i, row in enumerate(rows) if row["split"] == "run"][1]
    return [row["step"] for row in rows[:second] if row["split"] == "checkpoint"]


def test_a_preempted_local_job_checkpoints_requeues_and_ends_equal_to_an_uninterrupted_run(ddp_reference, tmp_path):
    run_dir = tmp_path / "run"
    submit = [SHARDVISION, "submit", "classification", "--cluster", "local", "--tasks-per-node", "2"]
    submit += ["--timeout-min", "30", *TRAJECTORY, "--output-dir", str(run_dir)]
    # To a file, not a pipe: the local job's controller inherits the submitting process's output
    # and keeps it open until the job ends.
    printed = tmp_path / "submit.out"
    with open(printed, "w") as out:
        code = subprocess.run(submit, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert code.returncode == 0, printed.read_text()[-3000:]
    shape = r"submitted job (\d+) \(local\): 1 node\(s\) x 2 task\(s\) = 2 ranks"
    job_id = int(re.search(shape, printed.read_text())[1])
    controller = psutil.Process(job_id)  # the local job's id is its controller's pid
    try:
        wait_until(lambda: logged_step(run_dir) >= 4, "step 4 of the first job")
        tasks = controller.children()
        assert len(tasks) == 2
        for task in tasks:  # as SLURM signals every task of a preempted job
            task.send_signal(signal.SIGUSR2)
        wait_until(lambda: len(read_metrics(run_dir, "run")) == 2, "the requeued job's start")
        assert not {t.pid for t in tasks} & {t.pid for t in controller.children()}  # new tasks: requeued
        wait_until(lambda: not controller.is_running() or controller.status() == psutil.STATUS_ZOMBIE, "the job's end")
    finally:
        for process in [controller, *controller.children(recursive=True)] if controller.is_running() else []:
            process.kill()

    logs = "\n".join(p.read_text() for p in sorted((run_dir / "submitit").glob("*_0_log.*")))
    assert re.search(r"stopped by SIGUSR2 at step \d+; .*submitit requeues the job", logs)  # what the user reads
    assert "Requeued job" in logs  # submitit's own word, after its checkpoint() call
    [saved] = saved_before_the_requeue(run_dir)  # the stop's checkpoint, and no other (none is due in TRAJECTORY)
    run = last_launch(run_dir)
    assert run["resumed_from"] == str(run_dir / "checkpoints" / str(saved)) and run["world_size"] == 2
    expected, got = train_losses(ddp_reference), train_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 23))
    assert all(losses == expected[step] for step, losses in got.items()), got  # no step trained twice
    assert final_weights_equal(ddp_reference, run_dir)


def test_the_sbatch_script_stops_its_ranks_on_usr1_requeues_and_the_requeued_job_resumes_exactly(
    ddp_reference, tmp_path
):
    run_dir, requeues = tmp_path / "run", tmp_path / "scontrol.log"
    env = run_env()
    env.update(
        PATH=os.pathsep.join([str(REPO / "tests" / "stand_ins"), str(Path(sys.executable).parent), env["PATH"]]),
        SCONTROL_LOG=str(requeues),
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="node-a",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="1",
        MASTER_PORT=str(free_port()),
    )
    job = ["bash", "launchers/slurm.sbatch", CLASSIFY, *TRAJECTORY, "--output-dir", str(run_dir)]
    script = subprocess.Popen(job, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: logged_step(run_dir) >= 4 or script.poll() is not None, "step 4")
        script.send_signal(signal.SIGUSR1)
        output = script.communicate(timeout=300)[0]
    finally:
        kill_tree(script.pid)
    assert script.returncode == 75, output[-3000:]
    assert "checkpoint written, requeueing job 77" in output and requeues.read_text() == "requeue 77\n"
    assert "stopped by SIGTERM at step" in output  # the script turns USR1 into the SIGTERM the ranks act on
    [saved] = [row["step"] for row in read_metrics(run_dir, "checkpoint")]

    requeued = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert last_launch(run_dir)["resumed_from"] == str(run_dir / "checkpoints" / str(saved))
    assert requeues.read_text() == "requeue 77\n"  # a run that finished is not requeued
    expected = train_losses(ddp_reference)
    assert all(losses == expected[step] for step, losses in train_losses(run_dir).items())
    assert final_weights_equal(ddp_reference, run_dir)
