"""The benchmark scripts stay runnable: each parses its arguments and imports what it needs.
(Their figures are ratios printed for people, never asserted: see docs/performance.md.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, run_env

SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name != "common.py")


def test_every_benchmark_is_documented():
    performance = (REPO / "docs" / "performance.md").read_text()
    readme = (REPO / "README.md").read_text()
    assert len(SCRIPTS) >= 6
    for script in SCRIPTS:
        assert f"benchmarks/{script}" in performance and f"benchmarks/{script}" in readme, script


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_gpu_benchmark_smoke_run_on_cpu():
    """Both loops of the GPU benchmark run end to end (tiny sizes; the figures mean nothing on CPU)."""
    cmd = [
        sys.executable,
        "benchmarks/gpu_throughput.py",
        "--cpu",
        "--models",
        "resnet18",
        "--image-size",
        "32",
        "--batch",
        "4",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--workers",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ratio shardvision / timm loop images/s")
