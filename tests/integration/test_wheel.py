"""The wheel as a user gets it: built from this checkout, installed into a new virtualenv that
cannot see the checkout, and run from another directory with only the files it ships: the
DeepSpeed ZeRO-2 accelerate config (whose `ds_configs/zero2.json` is relative), the DeepSpeed
JSON and the digits config, on 2 gloo ranks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.helpers import QUICK, REPO, free_port, last_launch, read_metrics, run_env


def run(cmd: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def test_the_installed_wheel_trains_under_deepspeed_from_another_directory(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info beside setup.py, in a checkout others share.
    source = tmp_path / "source"
    junk = (".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*junk))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", source], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("shardvision-*.whl")

    # A new virtualenv holding the wheel alone. The dependencies come from this one through a .pth
    # line, which adds its site-packages to the path without running the .pth files in it (the
    # editable install's, which would map `core` back to the checkout).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = run_env()
    del env["PYTHONPATH"]  # the suite's way to the checkout
    where = run(
        [python, "-c", "import core, recipes, core.shipped as s; print(core.__file__, recipes.__file__, s.ROOT)"],
        elsewhere,
        env,
    )
    assert all(Path(p).is_relative_to(site) for p in where.stdout.split()), where.stdout
    config = run(
        [python, "-m", "core.shipped", "accelerate_configs/deepspeed_zero2.yaml"], elsewhere, env
    ).stdout.strip()
    assert Path(config).is_relative_to(site)

    digits = site / "recipes" / "classification" / "configs" / "digits.yaml"
    launch = [python, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", 2]
    launch += ["--main_process_port", free_port(), "-m", "recipes.classification.train", "--config", digits, *QUICK]
    launch += ["--loop.max_steps", 2, "--output-dir", "run"]
    run(launch, elsewhere, env)

    run_dir = elsewhere / "run"
    facts = last_launch(run_dir)
    assert (facts["world_size"], facts["strategy"], facts["zero_stage"]) == (2, "deepspeed", 2)
    assert read_metrics(run_dir, "final")[-1]["step"] == 2
    assert (run_dir / "final" / "model.safetensors").is_file()
