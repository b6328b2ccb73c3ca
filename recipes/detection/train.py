"""Train or evaluate an object detector on COCO-format data.

Built-in CPU demo (synthetic shapes written in the COCO layout, 2 ranks over gloo):
    torchrun --nproc_per_node 2 recipes/detection/train.py \
        --config recipes/detection/configs/shapes.yaml --output-dir runs/shapes_det

The same script, unchanged, elsewhere:
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml recipes/detection/train.py \
        --config recipes/detection/configs/coco_fasterrcnn_r50_fpn.yaml --data.root /data/coco
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/detection/train.py --config ...
    python recipes/detection/train.py --config ... --eval-only --weights runs/x/final/model.safetensors

Evaluation writes <output_dir>/eval/step-<N>/predictions.json (COCO results format) and metrics.json.
"""

from core.entry import run
from recipes.detection.task import DetectionConfig, DetectionTask

# What `main` runs, and what `shardvision submit detection` runs in each task of a job.
CONFIG, TASK = DetectionConfig, DetectionTask


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(CONFIG, TASK, argv)


if __name__ == "__main__":
    main()
