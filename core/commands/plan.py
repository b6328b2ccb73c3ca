"""`shardvision plan TASK --config FILE`: will this run fit, under which strategy, at which micro-batch?

    shardvision plan classification --config recipes/classification/configs/imagenet_vit_b16.yaml \\
        --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB [--data.micro_batch_size 64 ...]

Before any launch, for the configured model, input, precision and optimizer, a table of the
memory one rank needs under DDP, ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 with offload and FSDP2, the
largest micro-batch that fits each, and the strategy it would pick.

- Model states come from the parameter count and each strategy's layout (bytes per parameter,
  per rank, for W ranks; h is 2 in bf16/fp16, 4 in fp32; s is the optimizer's state bytes per
  parameter, measured by one step of the configured optimizer on a small layer):
  DDP keeps fp32 weights (autocast) 4P, gradients 4P (views of its all-reduce buckets), state sP.
  ZeRO-1/2 keep h-byte weights hP and fp32 partitions: master 4P/W, gradients 4P/W, state sP/W.
  ZeRO-3 partitions the weights too, hP/W (parameters under stage3_param_persistence_threshold stay
  whole), gradients hP/W in h bytes plus the fp32 copy of the sub-group being stepped,
  min(4P/W, 4 sub_group_size), and keeps a reduce bucket of h reduce_bucket_size.
  ZeRO-3 offload keeps weights and buckets on the GPU; master, fp32 gradients and state in host
  memory. FSDP2 shards fp32 weights, gradients and state: (4 + 4 + s)P/W.
  The benchmark benchmarks/memory_per_rank.py measures these at the step's peak; the error per row
  is in docs/performance.md.
- In flight: memory a strategy holds only during forward and backward (ZeRO-1's whole h-byte
  gradients until the step, ZeRO-2's overlapping reduce buffers, ZeRO-3's prefetched layers,
  FSDP2's gathered units); it adds to activations at the peak.
- Activations are measured, not guessed: one real forward and backward on CPU at micro-batch 2
  and 4 of the configured training data, counting the bytes of every tensor autograd saves for
  backward (each storage once, parameters excluded), in the precision each strategy computes in
  (DDP autocasts over fp32 weights; DeepSpeed and FSDP2 hold h-byte weights), then extrapolated
  linearly to the micro-batch.

Not counted: the CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers (a fixed reserve of
RESERVE_BYTES is set aside instead); the caching allocator's fragmentation (FRAGMENTATION of the
rest is kept free); temporaries inside one operator and the gradients of activations during
backward (about one layer's activations); kernels that autocast treats differently on CUDA than on
CPU; evaluation, which needs no gradients and fits whenever training does; data loader memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from core.config_parsing import parse_args
from core.distributed import fsdp_unit_classes
from core.entry import TASKS, known_failures_exit, recipe
from core.errors import ConfigError
from core.lora import apply_lora, lora_enabled
from core.model_options import HALF_DTYPES, apply_model_options, cast_inputs
from core.shipped import shipped_path

STRATEGIES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload", "FSDP2")
# The pick: the first strategy that fits the configured micro-batch, least communication first.
PREFERENCE = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2", "ZeRO-3 offload")
DS_CONFIGS = {
    "ZeRO-1": "zero1.json",
    "ZeRO-2": "zero2.json",
    "ZeRO-3": "zero3.json",
    "ZeRO-3 offload": "zero3_offload.json",
}
# DeepSpeed 0.19's defaults where a config leaves a size out.
DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "sub_group_size": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}
RESERVE_BYTES = 2**30  # CUDA context, library workspaces, NCCL buffers
FRAGMENTATION = 0.10  # of what is left, kept free for the caching allocator
MEASURED_AT = (2, 4)  # the micro-batches activations are measured at
GiB = 2**30


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory: int = 80 * GiB  # bytes

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable(self) -> int:
        """What training may use on one GPU: the rest is the reserve and the allocator's slack."""
        return int((self.gpu_memory - RESERVE_BYTES) * (1 - FRAGMENTATION))


@dataclass
class ModelFacts:
    trainable: int  # parameters with gradients
    frozen: int
    persistent: int  # parameters small enough that ZeRO-3 keeps them whole on every rank
    largest_unit: int  # parameters of the largest module FSDP2 would gather at once
    optimizer_state_bytes: float  # per trainable parameter

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass
class Activations:
    """Bytes autograd keeps for backward: `fixed + per_sample * micro_batch`."""

    fixed: int
    per_sample: int
    measured: dict[int, int]  # micro-batch -> bytes, as counted

    def at(self, micro_batch: int) -> int:
        return self.measured.get(micro_batch, self.fixed + self.per_sample * micro_batch)


@dataclass
class StrategyPlan:
    """Bytes per rank under one strategy."""

    strategy: str
    weights: int = 0
    grads: int = 0
    master: int = 0
    optimizer: int = 0
    ema: int = 0
    buckets: int = 0
    in_flight: int = 0
    activations: int = 0
    host: int = 0  # in host memory (offload)
    fits: bool = False
    max_micro_batch: int = 0
    note: str = ""

    @property
    def states(self) -> int:
        """What the benchmark counts at the step's peak: everything but activations and in-flight."""
        return self.weights + self.grads + self.master + self.optimizer + self.ema + self.buckets

    @property
    def total(self) -> int:
        return self.states + self.in_flight + self.activations


@dataclass
class Plan:
    task: str
    model: str
    precision: str
    optimizer: str
    micro_batch: int
    cluster: Cluster
    facts: ModelFacts
    activations: dict[str, Activations]  # compute mode -> measured activations
    rows: list[StrategyPlan] = field(default_factory=list)
    pick: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for row, plain in zip(self.rows, out["rows"], strict=True):
            plain.update(states=row.states, total=row.total)
        return out


# --- what the model and optimizer hold --------------------------------------------------------


def optimizer_state_bytes(optim_cfg: Any) -> float:
    """State bytes per parameter of the configured optimizer, from one real step on a small layer."""
    from core.optim import build_optimizer

    cfg = copy.deepcopy(optim_cfg)
    cfg.layer_decay = None  # a property of the model's depth, not of the state it keeps
    layer = torch.nn.Linear(64, 64)
    optimizer = build_optimizer(layer, cfg)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    elements = sum(p.numel() for p in layer.parameters())
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.numel() > 1
    )
    return state / elements


def model_facts(model: torch.nn.Module, cfg: Any, persistence_threshold: int) -> ModelFacts:
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    units = fsdp_unit_classes(model, cfg.distributed.fsdp_auto_wrap_classes)  # the trainer's own choice
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in units]
    return ModelFacts(
        trainable=trainable,
        frozen=sum(p.numel() for p in params) - trainable,
        persistent=sum(p.numel() for p in params if p.numel() <= persistence_threshold),
        # Without wrapped units FSDP2 gathers the whole model at once.
        largest_unit=max(sizes) if sizes else sum(p.numel() for p in params),
        optimizer_state_bytes=optimizer_state_bytes(cfg.optim),
    )


def deepspeed_settings(name: str) -> dict[str, Any]:
    with open(shipped_path(f"ds_configs/{DS_CONFIGS[name]}")) as f:
        zero = json.load(f).get("zero_optimization", {})
    return {k: zero[k] if isinstance(zero.get(k), (int, float)) else v for k, v in DS_DEFAULTS.items()} | {
        "offload": "offload_optimizer" in zero
    }


def model_states(strategy: str, facts: ModelFacts, half: bool, world: int, ema: bool) -> StrategyPlan:
    """Bytes per rank of one strategy's model states (see the module docstring for the layout)."""
    h = 2 if half else 4
    P, A, s, W = facts.trainable, facts.total, facts.optimizer_state_bytes, world
    row = StrategyPlan(strategy)
    if strategy == "DDP":
        row.weights, row.grads, row.optimizer = 4 * A, 4 * P, int(s * P)
        row.ema = 4 * A if ema else 0
    elif strategy in ("ZeRO-1", "ZeRO-2"):
        ds = deepspeed_settings(strategy)
        row.weights, row.master, row.grads, row.optimizer = h * A, 4 * P // W, 4 * P // W, int(s * P / W)
        row.ema = 4 * A if ema else 0
        if strategy == "ZeRO-1":  # whole h-byte gradients, reduced at the step
            row.in_flight = h * P
        else:  # this rank's h-byte gradient partition and two overlapping reduce buffers
            row.in_flight = h * P // W + 2 * h * int(ds["reduce_bucket_size"])
    elif strategy in ("ZeRO-3", "ZeRO-3 offload"):
        ds = deepspeed_settings(strategy)
        row.weights = h * ((A - facts.persistent) // W + facts.persistent)
        row.buckets = h * int(ds["reduce_bucket_size"])
        row.ema = 4 * A // W if ema else 0
        # Layers gathered ahead of their use: the prefetch bucket, at most the whole model.
        row.in_flight = h * min(int(ds["stage3_prefetch_bucket_size"]), A)
        if ds["offload"]:
            row.grads = h * P // W
            row.host = 4 * P // W + 4 * P // W + int(s * P / W)  # master, fp32 gradients, state
        else:
            fp32_step_grads = min(4 * P // W, 4 * int(ds["sub_group_size"]))  # the sub-group being stepped
            row.master, row.grads, row.optimizer = 4 * P // W, h * P // W + fp32_step_grads, int(s * P / W)
    elif strategy == "FSDP2":
        row.weights, row.grads, row.optimizer = 4 * A // W, 4 * P // W, int(s * P / W)
        row.ema = 4 * A // W if ema else 0
        # The unit being computed and the one prefetched, gathered in h bytes; its gradients
        # unsharded in fp32 until reduce-scattered.
        row.in_flight = 2 * h * facts.largest_unit + 4 * facts.largest_unit
    else:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    return row


# --- activations ------------------------------------------------------------------------------


def compute_mode(strategy: str, precision: str) -> str:
    """How the strategy computes: DDP autocasts over fp32 weights; the others hold half weights."""
    if precision == "no":
        return "fp32"
    return "autocast" if strategy == "DDP" else "half"


def saved_bytes(task: Any, model: torch.nn.Module, batch: Any) -> int:
    """Bytes of the tensors autograd saves in one training step, each storage once, parameters
    and buffers excluded (they are model states)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned and storage.device.type != "meta":
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.training_step(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def measure_activations(
    task: Any, model: torch.nn.Module, samples: list, mode: str, precision: str, channels_last: bool
) -> Activations:
    """Saved bytes at micro-batches MEASURED_AT in one compute mode, and the line through them.
    In "half" mode the model is cast in place (the last mode measured)."""
    dtype = HALF_DTYPES.get(precision, torch.float32)
    if mode == "half":
        model.to(dtype)
    measured = {}
    for micro_batch in MEASURED_AT:
        batch = task.on_device(task.collate(samples[:micro_batch]))  # as the trainer's cast_inputs
        batch = cast_inputs(batch, task.input_keys, dtype if mode == "half" else None, channels_last)
        # CPU autocast: the op lists differ a little from CUDA's (said in what is not counted).
        autocast = mode == "autocast" or task.autocast_half_weights  # as the trainer runs the task
        with torch.autocast("cpu", dtype=dtype, enabled=autocast and precision != "no"):
            measured[micro_batch] = saved_bytes(task, model, batch)
    small, large = MEASURED_AT
    per_sample = max(0, (measured[large] - measured[small]) // (large - small))
    return Activations(fixed=max(0, measured[small] - per_sample * small), per_sample=per_sample, measured=measured)


# --- the plan ---------------------------------------------------------------------------------


def make_plan(task_name: str, cfg: Any, task: Any, cluster: Cluster) -> Plan:
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    if lora_enabled(cfg.model):  # frozen weights: no gradient, no optimizer state
        apply_lora(model, cfg.model, cfg.seed)
    apply_model_options(model, cfg)  # gradient checkpointing changes what is saved
    model.train()
    facts = model_facts(model, cfg, int(deepspeed_settings("ZeRO-3")["stage3_param_persistence_threshold"]))
    train_set, _ = task.build_datasets()
    if len(train_set) < max(MEASURED_AT):
        raise ConfigError(
            f"the training data has {len(train_set)} samples; measuring activations takes {max(MEASURED_AT)}"
        )
    samples = [train_set[i] for i in range(max(MEASURED_AT))]
    precision, micro_batch = cfg.loop.precision, cfg.data.micro_batch_size
    modes = sorted({compute_mode(s, precision) for s in STRATEGIES}, key=lambda m: m == "half")  # cast last
    activations = {
        mode: measure_activations(task, model, samples, mode, precision, cfg.model.channels_last) for mode in modes
    }

    plan = Plan(
        task=task_name,
        model=cfg.model.name,
        precision=precision,
        optimizer=cfg.optim.name,
        micro_batch=micro_batch,
        cluster=cluster,
        facts=facts,
        activations=activations,
    )
    for strategy in STRATEGIES:
        row = model_states(strategy, facts, precision != "no", cluster.world_size, cfg.loop.ema_decay is not None)
        act = activations[compute_mode(strategy, precision)]
        row.activations = act.at(micro_batch)
        row.fits = row.total <= cluster.usable
        room = cluster.usable - row.states - row.in_flight - act.fixed
        row.max_micro_batch = max(0, room // act.per_sample) if act.per_sample else 0
        notes = []
        if strategy == "FSDP2" and not fsdp_unit_classes(model, cfg.distributed.fsdp_auto_wrap_classes):
            notes.append(
                "no repeated layer to shard by (distributed.fsdp_auto_wrap_classes): the whole model is one unit"
            )
        row.note = "; ".join(notes)
        plan.rows.append(row)
    fitting = {r.strategy for r in plan.rows if r.fits}
    plan.pick = next((s for s in PREFERENCE if s in fitting), None)
    return plan


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '80G', '40960MiB' -> bytes (GB and G read as GiB: how GPUs are sold)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 80GiB or 40960MiB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def render(plan: Plan) -> str:
    c, f = plan.cluster, plan.facts

    def gib(n: float) -> str:
        return f"{n / GiB:.2f}"

    lines = [
        f"{plan.task} / {plan.model}: {f.total / 1e6:,.1f}M parameters ({f.trainable / 1e6:,.1f}M trained), "
        f"{plan.optimizer} ({f.optimizer_state_bytes:g} state bytes per parameter), precision {plan.precision}, "
        f"micro-batch {plan.micro_batch} per rank",
        f"cluster: {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.world_size} ranks, {gib(c.gpu_memory)} GiB each, "
        f"{gib(c.usable)} GiB usable (less {gib(RESERVE_BYTES)} GiB reserve and {FRAGMENTATION:.0%} for fragmentation)",
        "",
        "GiB per rank    weights  grads  master  optim    ema  buckets  in-flight  activations   total  fits"
        "  max micro-batch",
    ]
    for r in plan.rows:
        lines.append(
            f"{r.strategy:<15}{gib(r.weights):>8}{gib(r.grads):>7}{gib(r.master):>8}{gib(r.optimizer):>7}"
            f"{gib(r.ema):>7}{gib(r.buckets):>9}{gib(r.in_flight):>11}{gib(r.activations):>13}{gib(r.total):>8}"
            f"  {'yes' if r.fits else 'NO ':<4}{r.max_micro_batch:>16}"
            + (f"   host {gib(r.host)} GiB/rank, {gib(r.host * c.gpus_per_node)} GiB/node" if r.host else "")
            + (f"   ({r.note})" if r.note else "")
        )
    lines.append("")
    for mode, act in plan.activations.items():
        counted = ", ".join(f"{mb}: {n / 2**20:,.0f} MiB" for mb, n in act.measured.items())
        lines.append(
            f"activations ({mode}): measured at micro-batch {counted}; {act.per_sample / 2**20:,.1f} MiB per sample "
            f"+ {act.fixed / 2**20:,.0f} MiB fixed"
        )
    lines.append(
        f"pick: {plan.pick} (the first that fits, in the order {', '.join(PREFERENCE)})"
        if plan.pick
        else "pick: none fits at this micro-batch; lower data.micro_batch_size (raise loop.grad_accum_steps to keep "
        "the global batch), turn on model.grad_checkpointing, or add GPUs"
    )
    lines.append(
        "not counted: CUDA context, workspaces and NCCL buffers (the reserve), allocator fragmentation (the 10%), "
        "operator temporaries and activation gradients during backward (about one layer's activations), CUDA "
        "autocast's op lists (measured with CPU autocast), evaluation, data loading"
    )
    return "\n".join(lines)


def plan_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="shardvision plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other option is a run config key, as for `shardvision train TASK` (its --help lists them), "
        "e.g. --data.micro_batch_size 64.",
    )
    parser.add_argument("task", choices=TASKS, metavar="TASK", help=f"the recipe to plan for: {', '.join(TASKS)}")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the run (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (default 8)")
    parser.add_argument("--gpu-memory", type=parse_memory, default=80 * GiB, help="per GPU, e.g. 80GiB (default)")
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    args, rest = parser.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be at least 1")

    chosen = recipe(args.task)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory)
    with known_failures_exit():
        cfg = parse_args(chosen.CONFIG, rest)
        cfg.model.weights = None  # the plan needs shapes, not values
        plan = make_plan(args.task, cfg, chosen.TASK(cfg), cluster)
    print(render(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_json(), f, indent=1)
