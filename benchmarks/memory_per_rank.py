"""How much training state does each rank hold under DDP, ZeRO-1, ZeRO-2 and ZeRO-3?

    python benchmarks/memory_per_rank.py                       # ViT-B/16 (86M parameters), bf16, 2 CPU ranks
    python benchmarks/memory_per_rank.py --precision no        # fp32
    python benchmarks/memory_per_rank.py --model vit_large_patch16_224 --nproc 4

For each strategy it launches the real recipe engine on gloo ranks (accelerate launch with the
repo's configs) and takes one AdamW step. At the step's peak for training state, right after the
optimizer has updated the weights and before the gradients are released (a global optimizer
step hook), each rank counts the bytes of every live tensor, each storage once, sorted into:
weights (as the model holds them: ZeRO-3 holds only its partition), master weights and their
gradients (what the optimizer updates: DeepSpeed's fp32 partitions, or the model's own parameters
under DDP), optimizer state (AdamW's two moments), and other (DDP's gradient buckets, DeepSpeed's
reduce buckets and low-precision gradient partitions, buffers). Peak resident memory is reported
beside it. Last line: ZeRO-3's total per rank as a fraction of DDP's (target: <= 0.55).

The start-up, measured as a fine-tune from a local weights file (written once, random, by this
script): each rank's peak resident memory from just before the trainer is built to just after
(model built, weights loaded, strategy set up), less the training state it then holds (weights and
master copies), is the start-up transient: memory that was needed once and thrown away. It is
printed as a fraction of the model's fp32 size (target under ZeRO-3: < 0.10; ZeRO-3 builds the
model partitioned and streams the file into it, DDP builds it whole and reads the file whole).
    python benchmarks/memory_per_rank.py --model vit_large_patch16_224 --strategies DDP ZeRO-3 ZeRO-3-offload
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile

from common import SyntheticTask, add_worker_arguments, launch_ranks, write_report

STRATEGIES = {
    "DDP": "multi_gpu_ddp.yaml",
    "ZeRO-1": "deepspeed_zero1.yaml",
    "ZeRO-2": "deepspeed_zero2.yaml",
    "ZeRO-3": "deepspeed_zero3.yaml",
    "ZeRO-3-offload": "deepspeed_zero3_offload.yaml",
}
CATEGORIES = ("weights", "master", "grads", "optimizer", "other")


def storage_key(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def state_bytes(model, optimizer, zero) -> dict[str, int]:
    """Bytes per category of every live CPU tensor; a storage counts once, in the first category
    that claims it."""
    import torch

    seen: set[tuple[int, int]] = set()
    out = dict.fromkeys(CATEGORIES, 0)

    def claim(category: str, tensors) -> None:
        for t in tensors:
            if t is None or t.device.type != "cpu" or t.untyped_storage().data_ptr() == 0:
                continue
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                out[category] += key[1]

    params = list(model.parameters())
    claim("weights", [getattr(p, "ds_tensor", p) for p in params])
    master = [p for group in optimizer.param_groups for p in group["params"]]
    # DeepSpeed hands its torch optimizer one sub-group at a time; all of its fp32 partitions are master weights.
    claim(
        "master",
        master
        + list(
            getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", [])
        ),
    )
    claim("grads", [p.grad for p in master + params])
    claim("optimizer", [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)])
    gc.collect()
    rest = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                rest.append(obj)
        except Exception:  # objects that only pretend to be tensors
            continue
    claim("other", rest)
    return out


def write_weights(model_name: str, image_size: int, path: str) -> None:
    """A random checkpoint of the model, as a fine-tune would start from (written in this process:
    the ranks measured only read it)."""
    from safetensors.torch import save_file

    from common import create_timm_model

    model = create_timm_model(model_name, image_size, 1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine, take one optimizer step, report at its peak."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from core.config import TrainConfig
    from core.logging import memory_mb, peak_resident_mb
    from core.trainer import Trainer

    cfg = TrainConfig(output_dir=args.out)
    cfg.model.name, cfg.model.weights = args.model, args.weights
    cfg.data.micro_batch_size, cfg.data.num_workers = 2, 0
    cfg.loop.max_steps, cfg.loop.precision = 1, args.precision
    cfg.checkpoint.at_epoch_end = False
    cfg.logging.progress_bar, cfg.logging.trackers = False, []
    task = SyntheticTask(cfg, args.model, args.image_size, 2 * int(os.environ["WORLD_SIZE"]), num_classes=1000)
    before_start = peak_resident_mb()
    trainer = Trainer(cfg, task)
    model = trainer.accelerator.unwrap_model(trainer.model)
    zero = getattr(trainer.optimizer, "optimizer", None)  # DeepSpeed's ZeRO optimizer under accelerate's wrapper
    inner = getattr(zero, "optimizer", zero)  # the torch optimizer, under DeepSpeed's or on its own
    report: dict = {
        "startup_rss_bytes": (peak_resident_mb() - before_start) * 2**20,
        "state_at_start": sum(state_bytes(model, inner, zero).values()),
    }

    def at_peak(optimizer, *_):  # the inner torch optimizer, whoever wraps it (DeepSpeed: once per sub-group)
        counted = state_bytes(model, optimizer, zero)
        if sum(counted.values()) > sum(report.get(c, 0) for c in CATEGORIES):
            report.update(counted)

    hook = register_optimizer_step_post_hook(at_peak)
    trainer.train_one_epoch(0)
    hook.remove()
    report["parameters"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    report["peak_rss_bytes"] = memory_mb(trainer.accelerator.device) * 2**20
    write_report(args.out, trainer.accelerator.process_index, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--strategies", nargs="+", default=[n for n in STRATEGIES if n != "ZeRO-3-offload"], choices=list(STRATEGIES)
    )
    parser.add_argument("--weights", help=argparse.SUPPRESS)  # the workers' copy of the file main() wrote
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    with tempfile.TemporaryDirectory() as files:
        weights = os.path.join(files, "weights.safetensors")
        write_weights(args.model, args.image_size, weights)
        for name in dict.fromkeys(["DDP", "ZeRO-3", *args.strategies]):  # the ratio needs both
            config = STRATEGIES[name]
            with tempfile.TemporaryDirectory() as out:
                worker_args = [
                    "--model",
                    args.model,
                    "--precision",
                    args.precision,
                    "--image-size",
                    str(args.image_size),
                ]
                results[name] = launch_ranks(config, args.nproc, __file__, [*worker_args, "--weights", weights], out)

    def total(report: dict) -> int:
        return sum(report[c] for c in CATEGORIES)

    params = results["DDP"][0]["parameters"]
    precision = "fp32" if args.precision == "no" else args.precision
    print(
        f"{args.model}: {params / 1e6:.1f}M parameters, AdamW, {precision}, {args.nproc} ranks; MB per "
        "rank (the rank with the most)"
    )
    header = " ".join(f"{c:>9}" for c in CATEGORIES)
    print(f"{'strategy':<14} {header} {'total':>7} {'x DDP':>6} {'peak RSS':>9} {'start-up':>9} {'transient':>9}")
    ddp = max(total(r) for r in results["DDP"])
    fp32_model = 4 * params

    def transient(report: dict) -> int:
        return report["startup_rss_bytes"] - report["state_at_start"]

    for name in (n for n in STRATEGIES if n in results):
        reports = results[name]
        worst = max(reports, key=total)
        rss = max(r["peak_rss_bytes"] for r in reports)
        start = max(reports, key=transient)
        cells = " ".join(f"{worst[c] / 1e6:9.0f}" for c in CATEGORIES)
        print(
            f"{name:<14} {cells} {total(worst) / 1e6:7.0f} {total(worst) / ddp:6.2f} {rss / 1e6:9.0f} "
            f"{start['startup_rss_bytes'] / 1e6:9.0f} {transient(start) / fp32_model:9.2f}"
        )
    ratio = max(total(r) for r in results["ZeRO-3"]) / ddp
    print(f"ratio ZeRO-3 / DDP training state per rank: {ratio:.2f} (target <= 0.55)")
    worst_start = max(transient(r) for r in results["ZeRO-3"]) / fp32_model
    print(
        "start-up: MB more resident after building the trainer than before; transient: that less the "
        "training state then held, as a fraction of the fp32 model"
    )
    print(f"ZeRO-3 start-up transient / fp32 model size: {worst_start:.2f} (target < 0.10)")


if __name__ == "__main__":
    main()
