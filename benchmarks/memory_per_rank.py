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


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine, take one optimizer step, report at its peak."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from core.config import TrainConfig
    from core.logging import memory_mb
    from core.trainer import Trainer

    cfg = TrainConfig(output_dir=args.out)
    cfg.model.name = args.model
    cfg.data.micro_batch_size, cfg.data.num_workers = 2, 0
    cfg.loop.max_steps, cfg.loop.precision = 1, args.precision
    cfg.checkpoint.at_epoch_end = False
    cfg.logging.progress_bar, cfg.logging.tensorboard = False, False
    task = SyntheticTask(cfg, args.model, args.image_size, 2 * int(os.environ["WORLD_SIZE"]), num_classes=1000)
    trainer = Trainer(cfg, task)
    model = trainer.accelerator.unwrap_model(trainer.model)
    zero = getattr(trainer.optimizer, "optimizer", None)  # DeepSpeed's ZeRO optimizer under accelerate's wrapper
    report: dict = {}

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
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    for name in dict.fromkeys(["DDP", "ZeRO-3", *args.strategies]):  # the ratio needs both
        config = STRATEGIES[name]
        with tempfile.TemporaryDirectory() as out:
            worker_args = ["--model", args.model, "--precision", args.precision, "--image-size", str(args.image_size)]
            results[name] = launch_ranks(config, args.nproc, __file__, worker_args, out)

    def total(report: dict) -> int:
        return sum(report[c] for c in CATEGORIES)

    params = results["DDP"][0]["parameters"]
    precision = "fp32" if args.precision == "no" else args.precision
    print(
        f"{args.model}: {params / 1e6:.1f}M parameters, AdamW, {precision}, {args.nproc} ranks; MB per "
        "rank (the rank with the most)"
    )
    print(f"{'strategy':<8} " + " ".join(f"{c:>9}" for c in CATEGORIES) + f" {'total':>7} {'x DDP':>6} {'peak RSS':>9}")
    ddp = max(total(r) for r in results["DDP"])
    for name in (n for n in STRATEGIES if n in results):
        reports = results[name]
        worst = max(reports, key=total)
        rss = max(r["peak_rss_bytes"] for r in reports)
        cells = " ".join(f"{worst[c] / 1e6:9.0f}" for c in CATEGORIES)
        print(f"{name:<8} {cells} {total(worst) / 1e6:7.0f} {total(worst) / ddp:6.2f} {rss / 1e6:9.0f}")
    ratio = max(total(r) for r in results["ZeRO-3"]) / ddp
    print(f"ratio ZeRO-3 / DDP training state per rank: {ratio:.2f} (target <= 0.55)")


if __name__ == "__main__":
    main()
