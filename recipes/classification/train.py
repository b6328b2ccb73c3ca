"""Train or evaluate an image classifier.

Built-in CPU demo (scikit-learn digits, 2 ranks over gloo):
    torchrun --nproc_per_node 2 recipes/classification/train.py \
        --config recipes/classification/configs/digits.yaml --output-dir runs/digits

The same script, unchanged, elsewhere:
    python recipes/classification/train.py --config ...                       # one process
    python -m recipes.classification.train --config ...
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml recipes/classification/train.py --config ...
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/classification/train.py --config ...
    deepspeed --hostfile hosts recipes/classification/train.py --config ... \
        --distributed.deepspeed_config ds_configs/zero2.json
    python recipes/classification/train.py --config ... --eval-only --weights runs/x/final/model.safetensors

Any config key can be overridden: --optim.lr 3e-4 --loop.epochs 5. `--help` lists them all.
"""

from core.entry import run
from recipes.classification.task import ClassificationConfig, ClassificationTask

# What `main` runs, and what `shardvision submit classification` runs in each task of a job.
CONFIG, TASK = ClassificationConfig, ClassificationTask


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(CONFIG, TASK, argv)


if __name__ == "__main__":
    main()
