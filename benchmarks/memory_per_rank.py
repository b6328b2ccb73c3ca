"""How much training state does each rank hold under DDP, ZeRO-1, ZeRO-2, ZeRO-3 and FSDP2?

    python benchmarks/memory_per_rank.py                       # ViT-B/16 (86M parameters), bf16, 2 CPU ranks
    python benchmarks/memory_per_rank.py --precision no        # fp32
    python benchmarks/memory_per_rank.py --model vit_large_patch16_224 --nproc 4

For each strategy it launches the real recipe engine on gloo ranks (accelerate launch with the
repo's configs) and takes three AdamW steps (the first creates the optimizer's state, in the second
DDP rebuilds its buckets; the batches and samples are not counted). At the third step's peak for
training state, right after the optimizer has updated the weights and before the gradients are
released (a global optimizer step hook), each rank counts the bytes of every live tensor, each
storage once, sorted into: weights (as the model holds them: ZeRO-3 holds only its partition), master weights and their
gradients (what the optimizer updates: DeepSpeed's fp32 partitions, or the model's own parameters
under DDP), optimizer state (AdamW's two moments), and other (DeepSpeed's reduce buckets and
low-precision gradient partitions, buffers; DDP's gradients are views of its buckets). Peak
resident memory is reported beside it. Then: ZeRO-3's total per rank as a fraction of DDP's
(target: <= 0.55).

Last, `shardvision plan`'s figures for the same model, micro-batch and ranks (core/commands/plan.py)
beside the measured ones, with the error per row: the training state, and activations as torch's
MemTracker files them at the end of the third step's forward (issue #16's targets: 15% and 25%).
    python benchmarks/memory_per_rank.py --model resnet50 --micro-batch 32 --strategies DDP ZeRO-2 ZeRO-3

The start-up, measured as a fine-tune from a local weights file (written once, random, by this
script): each rank's peak resident memory from just before the trainer is built to just after
(model built, weights loaded, strategy set up), less the training state it then holds (weights and
master copies), is the start-up transient: memory that was needed once and thrown away. It is
printed as a fraction of the model's fp32 size (target under ZeRO-3 and FSDP2: < 0.10; ZeRO-3 builds
the model partitioned and streams the file into it, FSDP2 builds it on the meta device, shards it
and streams the file into the shards, DDP builds it whole and reads the file whole).
Part of it does not depend on the model (library code and buffers loaded while the engine is set
up): the same start-up of timm's `test_vit` (0.4M parameters) under ZeRO-3 (and FSDP2) measures it, and the
transient less that fixed part is printed as what grows with the model.
    python benchmarks/memory_per_rank.py --model vit_large_patch16_224 --strategies DDP ZeRO-3 ZeRO-3-offload

With --lora-rank R, the same ZeRO-3 fine-tune with LoRA adapters of rank R (model.lora_rank: the
family's default layers adapted, the head trained fully, the rest frozen) is measured too, as the
row ZeRO-3-LoRA, and its training state per rank is printed as a fraction of the full fine-tune's:
    python benchmarks/memory_per_rank.py --model vit_large_patch16_224 --strategies DDP ZeRO-3 --lora-rank 16
"""

from __future__ import annotations

import argparse
import contextlib
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
    "FSDP2": "fsdp.yaml",
}
CATEGORIES = ("weights", "master", "grads", "optimizer", "other")
LORA_ROW = "ZeRO-3-LoRA"  # ZeRO-3 again, with model.lora_rank (--lora-rank)
FIXED_COST_MODEL = "test_vit"  # 0.4M parameters: its start-up transient is what any model pays
# Before the measured step: the first creates the optimizer's state, the second is where DDP
# rebuilds its buckets in the order gradients arrived.
WARM_UP_STEPS = 2


def storage_key(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def local(tensor):
    """What this rank stores of `tensor`: an FSDP2 DTensor's own shard."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.to_local()


def state_bytes(model, optimizer, zero, data=()) -> dict[str, int]:
    """Bytes per category of every live CPU tensor; a storage counts once, in the first category
    that claims it. `data` (the samples and batches) is claimed before "other" and not counted."""
    import torch

    seen: set[tuple[int, int]] = set()
    out = dict.fromkeys([*CATEGORIES, "data"], 0)

    def claim(category: str, tensors) -> None:
        for t in tensors:
            t = t if t is None else local(t)
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
    claim("data", data)
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


class MeasuredTask(SyntheticTask):
    """Remembers the batches it builds and trains on, so they count as data, not as training state."""

    def collate(self, samples):
        self.batches = [super().collate(samples)]
        return self.batches[0]

    def training_step(self, model, batch):
        self.batches.append(batch)
        return super().training_step(model, batch)

    def data_tensors(self) -> list:
        import torch

        values = [v for sample in self.samples for v in sample.values()]
        values += [v for batch in self.batches for v in batch.values()]
        return [v for v in values if isinstance(v, torch.Tensor)]


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine, take WARM_UP_STEPS optimizer steps, then one more measured."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from core.config import TrainConfig
    from core.run_log import memory_mb, peak_resident_mb
    from core.trainer import Trainer

    cfg = TrainConfig(output_dir=args.out)
    cfg.model.name, cfg.model.weights, cfg.model.lora_rank = args.model, args.weights, args.lora_rank
    cfg.data.micro_batch_size, cfg.data.num_workers = args.micro_batch, 0
    cfg.loop.precision = args.precision
    cfg.checkpoint.at_epoch_end = False
    cfg.logging.progress_bar, cfg.logging.trackers = False, []
    task = MeasuredTask(
        cfg,
        args.model,
        args.image_size,
        (WARM_UP_STEPS + 1) * args.micro_batch * int(os.environ["WORLD_SIZE"]),
        num_classes=1000,
    )
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
        counted = state_bytes(model, optimizer, zero, task.data_tensors())
        if sum(counted[c] for c in CATEGORIES) > sum(report.get(c, 0) for c in CATEGORIES):
            report.update(counted)

    # torch's own account of every allocation, by what the tensor is for (the plan's comparison);
    # it hooks every parameter's gradient, which a frozen one (LoRA) does not have.
    tracker = MemTracker() if not args.lora_rank else None
    if tracker is not None:
        tracker.track_external(trainer.model, inner)
    with trainer._epoch_batches(0) as batches:
        batches = iter(batches)
        for _ in range(WARM_UP_STEPS):
            trainer.train_step(next(batches)[0], 0)
        hook = register_optimizer_step_post_hook(at_peak)
        with tracker if tracker is not None else contextlib.nullcontext():
            trainer.train_step(next(batches)[0], 0)
        hook.remove()
    snapshots = tracker.memory_tracking[model].snapshots if tracker is not None else {}
    for state in (_ModState.POST_FW, _ModState.PEAK_FW, _ModState.PEAK_BW):
        for snap in snapshots.get(state, []):
            for key, value in snap[torch.device("cpu")].items():
                report.setdefault(f"{state.value}/{key}", value)
    report["parameters"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    report["trainable"] = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad
    )
    report["peak_rss_bytes"] = memory_mb(trainer.accelerator.device) * 2**20
    write_report(args.out, trainer.accelerator.process_index, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--strategies", nargs="+", default=[n for n in STRATEGIES if n != "ZeRO-3-offload"], choices=list(STRATEGIES)
    )
    parser.add_argument("--lora-rank", type=int, default=0, help="also measure a ZeRO-3 LoRA fine-tune of this rank")
    parser.add_argument("--weights", help=argparse.SUPPRESS)  # the workers' copy of the file main() wrote
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    with tempfile.TemporaryDirectory() as files:

        def measure(model: str, strategy: str, lora_rank: int = 0) -> list[dict]:
            weights = os.path.join(files, f"{model}.safetensors")
            if not os.path.exists(weights):
                write_weights(model, args.image_size, weights)
            worker_args = ["--model", model, "--precision", args.precision, "--image-size", str(args.image_size)]
            worker_args += ["--micro-batch", str(args.micro_batch), "--weights", weights]
            worker_args += ["--lora-rank", str(lora_rank)]
            with tempfile.TemporaryDirectory() as out:
                return launch_ranks(STRATEGIES[strategy], args.nproc, __file__, worker_args, out)

        for name in dict.fromkeys(["DDP", "ZeRO-3", *args.strategies]):  # the ratio needs both
            results[name] = measure(args.model, name)
        if args.lora_rank:
            results[LORA_ROW] = measure(args.model, "ZeRO-3", args.lora_rank)
        fixed_cost = {name: measure(FIXED_COST_MODEL, name) for name in ("ZeRO-3", "FSDP2") if name in results}

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

    for name in (n for n in [*STRATEGIES, LORA_ROW] if n in results):
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
    if LORA_ROW in results:
        lora = max(total(r) for r in results[LORA_ROW]) / max(total(r) for r in results["ZeRO-3"])
        trainable = max(r["trainable"] for r in results[LORA_ROW])
        print(
            f"ratio ZeRO-3 LoRA rank {args.lora_rank} / ZeRO-3 full fine-tune, training state per rank: {lora:.2f} "
            f"({trainable / 1e6:.2f}M of {params / 1e6:.1f}M parameters trained)"
        )
    print(
        "start-up: MB more resident after building the trainer than before; transient: that less the "
        "training state then held, as a fraction of the fp32 model"
    )
    for name, fixed_reports in fixed_cost.items():
        worst_start = max(transient(r) for r in results[name])
        fixed = max(transient(r) for r in fixed_reports)
        print(f"{name} start-up transient / fp32 model size: {worst_start / fp32_model:.2f}")
        print(
            f"of which the same for any model ({FIXED_COST_MODEL}'s transient under {name}): {fixed / 1e6:.0f} MB; "
            f"what grows with the model: {(worst_start - fixed) / fp32_model:.2f} of its fp32 size (target < 0.10)"
        )
    compare_with_plan(args, results)


def compare_with_plan(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    """`shardvision plan`'s figures for the same model, batch and ranks beside the measured ones.
    Activations measured: what torch's MemTracker files as activations when the forward ends (the
    plan's quantity), and the forward/backward peak of activations plus temporaries beside it."""
    from core.commands.plan import Cluster, make_plan
    from core.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.name, cfg.data.micro_batch_size, cfg.loop.precision = args.model, args.micro_batch, args.precision
    task = SyntheticTask(cfg, args.model, args.image_size, 4, num_classes=1000)
    plan = make_plan("classification", cfg, task, Cluster(1, args.nproc))
    planned = {row.strategy.replace(" ", "-"): row for row in plan.rows}

    def measured_activations(report: dict, *states: str) -> float:
        return max(sum(report.get(f"{state}/_MemRefType.{kind}", 0) for kind in ("ACT", "TEMP")) for state in states)

    print(f"\nplanned against measured, micro-batch {args.micro_batch}, MB per rank (the rank with the most)")
    print(
        f"{'strategy':<14} {'states':>7} {'planned':>8} {'error':>6}   {'activations':>11} {'planned':>8} "
        f"{'error':>6}   {'peak act+temp':>13}"
    )
    for name in (n for n in STRATEGIES if n in results):
        row, reports = planned[name], results[name]
        states = max(sum(r[c] for c in CATEGORIES) for r in reports)
        planned_states = row.states + row.host  # host and device are one memory on CPU
        act = max(measured_activations(r, "Post-Forward") for r in reports)
        peak = max(measured_activations(r, "Peak-Forward", "Peak-Backward") for r in reports)
        print(
            f"{name:<14} {states / 1e6:7.0f} {planned_states / 1e6:8.0f} {planned_states / states - 1:+6.1%}   "
            f"{act / 1e6:11.0f} {row.activations / 1e6:8.0f} {row.activations / act - 1:+6.1%}   {peak / 1e6:13.0f}"
        )


if __name__ == "__main__":
    main()
