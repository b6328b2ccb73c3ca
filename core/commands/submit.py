"""`shardvision submit`: a training run as a SLURM job (or a local one) through submitit, one task
per rank, that checkpoints and requeues itself when preempted or timed out.

    shardvision submit classification --config recipes/classification/configs/imagenet_vit_b16.yaml \\
        --nodes 2 --tasks-per-node 8 --timeout-min 1440 --partition gpu --output-dir /shared/runs/vit

Every task is one rank: submitit's JobEnvironment gives its global and local rank and the job's
hosts, which become the variables torchrun would have set (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the task runs the recipe as `shardvision train`
would. Before a preemption or the time limit SLURM sends submitit's signal (SIGUSR2) to every
task. submitit's own handler would checkpoint and requeue at once, on rank 0 alone, in the middle
of whatever the ranks were doing; here the trainer takes the signal instead, on every rank, like
SIGTERM: the current optimizer step (or evaluation batch) ends, every rank writes its part of a
checkpoint, and only then does rank 0 hand over to submitit's handler, whose `checkpoint()` call
returns this same run with `--resume auto` and which requeues the job. The requeued job resumes
where the run stopped, as many times as it takes. A SIGTERM that is not a preemption (scancel)
still checkpoints, but does not requeue.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import zlib
from typing import Any

import yaml

from core.config_parsing import parse_args
from core.entry import TASKS, known_failures_exit, leave, one_of_several_ranks, recipe, train
from core.errors import ConfigError, Preempted
from core.exit_codes import ExitCode

SIGNAL_DELAY_S = 180  # how long before the time limit the signal comes: time for a save of a large model
MAX_TIMEOUTS = 1000  # requeues after hitting the time limit (preemptions are not counted by submitit)


class SubmittedRun:
    """What each task of the job runs: one rank of `shardvision train TASK ARGV`. submitit pickles
    it, calls it in every task, and calls `checkpoint()` on rank 0 to requeue it."""

    def __init__(self, task: str, argv: list[str]):
        self.task, self.argv = task, argv

    def __call__(self) -> dict[str, float]:
        import submitit

        job = submitit.JobEnvironment()
        _set_rank_environment(job)
        preemption = job._usr_sig()  # SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        requeue = signal.getsignal(preemption)  # submitit's handler, replaced by the trainer's while it runs
        chosen = recipe(self.task)
        with known_failures_exit():
            try:
                metrics = train(chosen.CONFIG, chosen.TASK, self.argv)
            except Preempted as stop:
                if stop.signal == signal.Signals(preemption).name or job.global_rank != 0:
                    _requeue(job.global_rank, stop, requeue, preemption)
                raise  # a stop that is not a preemption: exit 75, no requeue
        if one_of_several_ranks():
            leave(ExitCode.SUCCESS)
        return metrics

    def checkpoint(self) -> Any:
        """Called by submitit's handler on rank 0 once the run's own checkpoint is written (see
        `_requeue`): the same run, resumed from its newest checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(SubmittedRun(self.task, with_resume_auto(self.argv)))


def _requeue(rank: int, stop: Preempted, submitits_handler: Any, preemption: int) -> None:
    """After the stop's checkpoint: rank 0 runs submitit's handler, which calls `checkpoint()`,
    requeues the job and exits; the other ranks leave at once (rank 0 speaks for them)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if rank != 0:
        os._exit(ExitCode.PREEMPTED)
    print(f"shardvision: {stop} (submitit requeues the job, with --resume auto)", file=sys.stderr, flush=True)
    code: Any = ExitCode.PREEMPTED
    try:
        submitits_handler(preemption, None)
    except SystemExit as exit_:  # how submitit leaves after requeueing (144 tells its local controller to)
        code = exit_.code
    except Exception as e:  # e.g. timed out too many times: say so, and exit as preempted
        print(f"shardvision: the job was not requeued: {e}", file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else ExitCode.PREEMPTED)  # past the gloo teardown race (core/entry.py)


def _set_rank_environment(job: Any) -> None:
    """The variables torchrun sets, from submitit's view of the job: accelerate reads them."""
    per_node = job.num_tasks // job.num_nodes
    os.environ.update(
        RANK=str(job.global_rank),
        LOCAL_RANK=str(job.local_rank),
        WORLD_SIZE=str(job.num_tasks),
        LOCAL_WORLD_SIZE=str(per_node),
        MASTER_ADDR=job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1",
        # the same on every task, and again after a requeue (SLURM keeps the job id)
        MASTER_PORT=str(20000 + zlib.crc32(str(job.job_id).encode()) % 20000),
    )


def with_resume_auto(argv: list[str]) -> list[str]:
    """`argv` with `--resume auto` in place of any other --resume: a requeued job continues from
    its own newest checkpoint, not from where the first submission started."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv)
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    return [*kept, "--resume", "auto"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardvision submit",
        description=__doc__,
        epilog="Every other option is a training option, as for `shardvision train TASK` (its --help lists them).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a training flag must never be taken for an abbreviated submission option
    )
    parser.add_argument("task", choices=TASKS, metavar="TASK", help=f"the recipe to train: {', '.join(TASKS)}")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm", help="local: this machine, no SLURM")
    parser.add_argument("--nodes", type=int, default=1, help="nodes for the job (default 1)")
    parser.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node: one per GPU")
    parser.add_argument("--timeout-min", type=int, default=24 * 60, help="the job's time limit, in minutes")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other parameter of submitit's SlurmExecutor (account=..., constraint=..., gpus_per_node=0, "
        f"mem_gb=..., signal_delay_s=..., default {SIGNAL_DELAY_S}); repeatable",
    )
    parser.add_argument("--job-dir", help="submitit's folder: job pickles and logs (default <output_dir>/submitit)")
    return parser


def submit_main(argv: list[str]) -> None:
    args, train_argv = build_parser().parse_known_args(argv)
    chosen = recipe(args.task)
    with known_failures_exit():  # a bad flag fails here, not in the queue hours later
        cfg = parse_args(chosen.CONFIG, train_argv)
        job_dir = os.path.abspath(args.job_dir or os.path.join(cfg.output_dir, "submitit"))
        executor = _executor(args, job_dir)
    # The job may start elsewhere (another working directory, another node): absolute paths.
    output_dir = os.path.abspath(cfg.output_dir)
    train_argv = _absolute_config(train_argv) + ["--output-dir", output_dir]
    job = executor.submit(SubmittedRun(args.task, train_argv))
    ranks = args.nodes * args.tasks_per_node
    shape = f"{args.nodes} node(s) x {args.tasks_per_node} task(s) = {ranks} ranks"
    print(f"submitted job {job.job_id} ({args.cluster}): {shape}")
    print(f"run folder: {output_dir}")
    print(f"logs: {job.paths.stdout} and {job.paths.stderr} (rank 0; the other ranks beside them), in {job_dir}")


def _executor(args: argparse.Namespace, job_dir: str) -> Any:
    import submitit

    if args.cluster == "local":
        if args.nodes != 1:
            raise ConfigError(f"--nodes {args.nodes}: --cluster local runs on this machine only (--nodes 1)")
        if args.slurm or args.partition:
            raise ConfigError("--slurm and --partition are for --cluster slurm")
        local = submitit.LocalExecutor(job_dir, max_num_timeout=MAX_TIMEOUTS)
        local.update_parameters(
            timeout_min=args.timeout_min, tasks_per_node=args.tasks_per_node, signal_delay_s=SIGNAL_DELAY_S
        )
        return local
    params: dict[str, Any] = dict(
        job_name="shardvision",
        nodes=args.nodes,
        ntasks_per_node=args.tasks_per_node,
        gpus_per_node=args.tasks_per_node,
        time=args.timeout_min,
        signal_delay_s=SIGNAL_DELAY_S,
    )
    if args.partition:
        params["partition"] = args.partition
    for pair in args.slurm:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm {pair}: expected KEY=VALUE, e.g. --slurm constraint=volta32gb")
        params[key] = yaml.safe_load(value)  # 0 -> int, true -> bool, anything else a string
    try:
        executor = submitit.SlurmExecutor(job_dir, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as e:  # no srun here
        raise ConfigError(f"--cluster slurm: {e} (--cluster local runs the job on this machine)") from None
    try:
        executor.update_parameters(**params)
    except (TypeError, ValueError, NameError) as e:
        raise ConfigError(f"--slurm: {e}") from None
    return executor


def _absolute_config(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--config" and os.path.exists(out[i + 1]):
            out[i + 1] = os.path.abspath(out[i + 1])
    return out
