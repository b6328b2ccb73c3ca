"""Train or evaluate a semantic segmentation model.

Built-in CPU demo (synthetic shapes written as VOC-layout JPEG/PNG pairs, 2 ranks over gloo):
    torchrun --nproc_per_node 2 recipes/segmentation/train.py \
        --config recipes/segmentation/configs/shapes.yaml --output-dir runs/shapes_seg

The same script, unchanged, elsewhere:
    python recipes/segmentation/train.py --config ...                       # one process
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml recipes/segmentation/train.py \
        --config recipes/segmentation/configs/voc_deeplabv3_r50.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/segmentation/train.py \
        --config recipes/segmentation/configs/ade20k_segformer_b0.yaml
    python recipes/segmentation/train.py --config ... --eval-only --weights runs/x/final/model.safetensors

Any config key can be overridden: --data.image_size 384 --model.num_classes 150. `--help` lists them all.
"""

from core.entry import run
from recipes.segmentation.task import SegmentationConfig, SegmentationTask

# What `main` runs, and what `shardvision submit segmentation` runs in each task of a job.
CONFIG, TASK = SegmentationConfig, SegmentationTask


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(CONFIG, TASK, argv)


if __name__ == "__main__":
    main()
