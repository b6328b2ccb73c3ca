"""shardvision: train and fine-tune vision models at scale on accelerate and DeepSpeed."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
TRACKERS = ["mlflow-skinny", "sqlalchemy", "alembic", "wandb"]
# shardvision export --onnx: torch's ONNX exporter (onnx, onnxscript) and the runtime that checks it
ONNX = ["onnx", "onnxscript", "onnxruntime"]
# Launch files the commands name from the repository root. A wheel has no root, so each folder
# becomes a data-only package inside core (core/ds_configs/...), found by core/shipped.py.
SHIPPED = {"accelerate_configs": ["*.yaml"], "ds_configs": ["*.json"], "launchers": ["*.sbatch"]}


def pinned(names: list[str]) -> list[str]:
    """`name==version` for each name, from requirements.lock (the one place versions live)."""
    with open(os.path.join(HERE, "requirements.lock")) as f:
        lock = dict(m.groups() for m in (re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line) for line in f) if m)
    lock = {k.lower().replace("_", "-"): v for k, v in lock.items()}
    missing = [n for n in names if n not in lock]
    if missing:
        raise SystemExit(f"requirements.lock has no pin for {missing}")
    return [f"{n}=={lock[n]}" for n in names]


setup(
    name="shardvision",
    version="0.1.0",
    description="Train and fine-tune vision models at scale on accelerate and DeepSpeed",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    # CI and the development machines run 3.11; the pinned numpy (2.4) needs at least that.
    python_requires=">=3.11",
    classifiers=["Programming Language :: Python :: 3", "Programming Language :: Python :: 3.11"],
    packages=[*find_packages(include=["core", "core.*", "recipes", "recipes.*"]), *(f"core.{d}" for d in SHIPPED)],
    package_dir={f"core.{d}": d for d in SHIPPED},
    package_data={
        "recipes": ["*/configs/*.yaml", "*/configs/*/*.json"],
        **{f"core.{d}": p for d, p in SHIPPED.items()},
    },
    install_requires=pinned(
        [
            "torch",
            "torchvision",
            "accelerate",
            "deepspeed",
            "timm",
            "transformers",
            "datasets",
            "safetensors",
            "tensorboard",
            "scikit-learn",
            "pycocotools",
            "pyyaml",
            "tqdm",
            "pillow",
            "numpy",
            "xxhash",
            "submitit",
            "matplotlib",
            "braceexpand",
            "peft",
        ]
    ),
    extras_require={
        # logging.trackers: mlflow (its client and the local sqlite store, without the server) and wandb
        "trackers": pinned(TRACKERS),
        "onnx": pinned(ONNX),
        "dev": pinned(
            [
                *TRACKERS,
                *ONNX,
                "pytest",
                "pytest-timeout",
                "pytest-xdist",
                "torchmetrics",
                "psutil",
                "ruff",
                "mypy",
                "types-pyyaml",
                "types-tqdm",
                "pre-commit",
            ]
        ),
    },
    entry_points={"console_scripts": ["shardvision=core.commands.cli:main"]},
)
