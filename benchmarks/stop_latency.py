"""How long from a stop signal during a long evaluation to the run's exit?

    python benchmarks/stop_latency.py                      # digits at 320 px, 2 ranks, SIGTERM 2 s in
    python benchmarks/stop_latency.py --image-size 448 --delay 5

The digits recipe runs one optimizer step on 2 gloo ranks (torchrun) at a large image size, so
the evaluation after it takes many seconds; its checkpoint is written before the evaluation. Run
twice: uninterrupted, timing the evaluation and everything after it (from the checkpoint's
publication to the launcher's exit); then with SIGTERM sent to every rank `--delay` seconds into
the evaluation, timing signal to exit (code 75 from the workers). Last line: the stopped run's
signal-to-exit time as a fraction of the uninterrupted tail; a scheduler's grace period must
cover the stop's time, not the evaluation's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import DIGITS, QUICK, launch_command, rank_processes, run_env  # noqa: E402


def timed_run(out: Path, image_size: int, delay: float | None) -> tuple[float, str]:
    """Seconds from checkpoint 1's publication (or from the signal, with `delay`) to the exit."""
    args = ["--config", DIGITS, *QUICK, "--output-dir", str(out), "--loop.max_steps", "1"]
    args += ["--data.image_size", str(image_size), "--data.eval_micro_batch_size", "16"]
    proc = subprocess.Popen(
        launch_command(args, "torchrun"), cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    published = out / "checkpoints" / "1" / "manifest.json"
    while not published.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended first:\n{proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.005)
    started = time.perf_counter()
    if delay is not None:
        time.sleep(delay)
        started = time.perf_counter()
        for worker in rank_processes(proc.pid).values():
            worker.send_signal(signal.SIGTERM)
    stderr = proc.communicate()[1].decode()
    elapsed = time.perf_counter() - started
    expected = "exitcode  : 75" if delay is not None else None
    if (expected and expected not in stderr) or (expected is None and proc.returncode != 0):
        raise SystemExit(f"unexpected end (exit {proc.returncode}):\n{stderr[-3000:]}")
    stopped = [line for line in stderr.splitlines() if "during the evaluation" in line]
    return elapsed, stopped[0].split("shardvision: ")[-1] if stopped else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds into the evaluation to send SIGTERM")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tail, _ = timed_run(Path(tmp) / "uninterrupted", args.image_size, None)
        print(f"uninterrupted: evaluation, export and exit took {tail:.1f} s after the checkpoint")
        stop, said = timed_run(Path(tmp) / "stopped", args.image_size, args.delay)
        print(f"SIGTERM {args.delay:g} s into the evaluation: exit 75 after {stop:.1f} s ({said})")
    print(f"signal-to-exit / uninterrupted evaluation tail: {stop / tail:.2f}")


if __name__ == "__main__":
    main()
