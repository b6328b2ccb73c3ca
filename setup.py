"""shardvision: train and fine-tune vision models at scale on accelerate and DeepSpeed."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
TRACKERS = ["mlflow-skinny", "sqlalchemy", "alembic", "wandb"]


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
    python_requires=">=3.10",
    packages=find_packages(include=["core", "core.*", "recipes", "recipes.*"]),
    package_data={"recipes": ["*/configs/*.yaml", "*/configs/*/*.json"]},
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
        ]
    ),
    extras_require={
        # logging.trackers: mlflow (its client and the local sqlite store, without the server) and wandb
        "trackers": pinned(TRACKERS),
        "dev": pinned(
            [
                *TRACKERS,
                "pytest",
                "pytest-timeout",
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
    entry_points={"console_scripts": ["shardvision=core.cli:main"]},
)
