#!/usr/bin/env bash
# The GPU check: what CPU ranks cannot show, on one GPU machine, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT: where logs and run folders go (default: $OUT or runs/gpu_check)
#
# Run from the repository root on a machine with a CUDA GPU and the project installed (make install).
# Each part prints one line PASS/FAIL with its figure; the logs of every run stay under OUT.
#   1. FSDP2 on NCCL, bf16 (MixedPrecisionPolicy): a run SIGKILLed after its checkpoint at step 4
#      resumes and repeats the uninterrupted run's losses (bf16 on GPU: to 1e-3 relative).
#   2. DeepSpeed ZeRO-3 on NCCL, bf16: the same kill and resume.
#   3. fp16 under DDP with its loss scaler (the run's scale is logged; no step may be non-finite).
#   4. The background save's stall: the `checkpoint` rows' stall_s with checkpoint.async_save true
#      against false, on the same run (pinned host buffers on GPU).
#   5. benchmarks/gpu_throughput.py: images/s of the shardvision loop against timm's loop.
# Record the lines it prints in docs/performance.md ("GPU check"), with the device and the date.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH=$PWD
# GPU_CHECK_ON_CPU=1 runs the script's own logic on CPU ranks (a smoke test of the script: the fp16
# part then fails, as fp16 needs a GPU, and the figures mean nothing).
if [ -z "${GPU_CHECK_ON_CPU:-}" ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; this check is for a GPU machine" >&2
    exit 2
fi
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__)" | tee "$OUT/summary.txt"

# The digits demo on a small ViT, 8 steps, a checkpoint every 4, logging every step.
RUN=(recipes/classification/train.py --config recipes/classification/configs/digits.yaml
     --model.name vit_tiny_patch16_224 --model.kwargs "{img_size: 32, patch_size: 4}"
     --loop.max_steps 8 --checkpoint.every_steps 4 --checkpoint.at_epoch_end false
     --logging.every_steps 1 --logging.progress_bar false --logging.trackers "[]" --loop.precision bf16)

launch() {  # launch NAME ACCELERATE_CONFIG ARGS...: one accelerate launch on the one GPU, logged
    local name=$1 config=$2; shift 2
    timeout 300 $PY -m accelerate.commands.launch --config_file "accelerate_configs/$config" --num_processes 1 \
        --main_process_port $((20000 + RANDOM % 20000)) "$@" > "$OUT/$name.log" 2>&1
}

kill_after_checkpoint() {  # NAME CONFIG ARGS...: start a run, SIGKILL it once checkpoint 4 is published
    local name=$1 config=$2; shift 2
    $PY -m accelerate.commands.launch --config_file "accelerate_configs/$config" --num_processes 1 \
        --main_process_port $((20000 + RANDOM % 20000)) "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$! waited=0
    until [ -f "$OUT/$name/checkpoints/4/manifest.json" ] || ! kill -0 $pid 2>/dev/null || [ $waited -ge 3000 ]; do
        sleep 0.1; waited=$((waited + 1))
    done
    pkill -KILL -P $pid; kill -KILL $pid 2>/dev/null; wait $pid 2>/dev/null
}

same_losses() {  # REFERENCE RESUMED TOLERANCE: the resumed run's steps 5-8 against the reference's
    $PY - "$1" "$2" "$3" <<'EOF'
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if r["split"] == "train"}
ref, got, tol = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
runs = [json.loads(l) for l in open(f"{sys.argv[2]}/metrics.jsonl")]
resumed = [r for r in runs if r["split"] == "run"][-1].get("resumed_from")
worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in range(5, 9))
print(f"resumed from {resumed}; steps 5-8 within {worst:.2e} relative of the uninterrupted run")
sys.exit(0 if resumed and worst <= tol else 1)
EOF
}

report() {  # NAME STATUS DETAIL
    local verdict=PASS; [ "$2" -eq 0 ] || verdict=FAIL
    echo "$verdict $1: $3" | tee -a "$OUT/summary.txt"
}

for strategy in fsdp deepspeed_zero3; do
    rm -rf "$OUT/$strategy" "$OUT/$strategy-killed"
    launch "$strategy" "$strategy.yaml" "${RUN[@]}" --output-dir "$OUT/$strategy"; rc=$?
    kill_after_checkpoint "$strategy-killed" "$strategy.yaml" "${RUN[@]}" --output-dir "$OUT/$strategy-killed"
    launch "$strategy-resumed" "$strategy.yaml" "${RUN[@]}" --output-dir "$OUT/$strategy-killed" --resume auto
    rc=$((rc + $?))
    detail=$(same_losses "$OUT/$strategy" "$OUT/$strategy-killed" 1e-3 2>&1); rc=$((rc + $?))
    report "$strategy bf16 on NCCL, SIGKILL and resume" $rc "$detail"
done

rm -rf "$OUT/fp16"
launch fp16 multi_gpu_ddp.yaml "${RUN[@]/bf16/fp16}" --output-dir "$OUT/fp16"; rc=$?
detail=$($PY -c "
import json, math
rows = [json.loads(l) for l in open('$OUT/fp16/metrics.jsonl')]
train = [r for r in rows if r['split'] == 'train']
assert train and all(math.isfinite(r['loss']) for r in train)
print(f\"{len(train)} steps, last loss {train[-1]['loss']:.4f}, skipped steps {rows[-1].get('skipped_steps', 0)}\")
" 2>&1); rc=$((rc + $?))
report "fp16 DDP with the loss scaler" $rc "$detail"

for mode in true false; do
    rm -rf "$OUT/save-$mode"
    launch "save-$mode" single_gpu.yaml "${RUN[@]}" --loop.max_steps 12 --checkpoint.every_steps 2 \
        --checkpoint.async_save $mode --output-dir "$OUT/save-$mode"
done
detail=$($PY -c "
import json, statistics
def stall(mode):
    rows = [json.loads(l) for l in open(f'$OUT/save-{mode}/metrics.jsonl')]
    return statistics.median(r['stall_s'] for r in rows if r['split'] == 'checkpoint')
a, s = stall('true'), stall('false')
print(f'median stall per save: background {a:.3f} s, synchronous {s:.3f} s, ratio {a / s:.2f}')
" 2>&1); rc=$?
report "background save stall" $rc "$detail"

throughput=(--repeats 1); [ -z "${GPU_CHECK_ON_CPU:-}" ] || throughput+=(--cpu --models resnet18 --image-size 64 --batch 8 --steps 3)
timeout 240 $PY benchmarks/gpu_throughput.py "${throughput[@]}" > "$OUT/gpu_throughput.log" 2>&1; rc=$?
report "gpu_throughput (shardvision / timm loop)" $rc "$(tail -n 1 "$OUT/gpu_throughput.log")"
echo "summary: $OUT/summary.txt"
