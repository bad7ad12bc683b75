#!/usr/bin/env bash
# The GPU checks behind docs/BENCHMARKS.md "GPU", as one script for a short-lived GPU machine.
#
#   OUT=/tmp/gpu_out DATA=path/to/pusht_cchi_v7_replay.zarr bash scripts/gpu_checks.sh
#
# Stages (each with its own time limit; a failed stage does not stop the next):
#   1. the CUDA tests: graphed training step == eager step (state and image), resume, CUDA-graph sampling
#   2. training throughput of the paper's state preset: eager, CUDA graph, CUDA graph + bf16
#   3. batch-1 chunk latency of the paper's state model per backend and step count
#   4. time to score: train the paper's state preset with the fastest variant whose loss curve
#      matched eager, evaluating (DDPM-100, 50 episodes) every EVAL_EVERY steps
#   5. training throughput of the paper's image preset: eager against CUDA graph + bf16
# Everything lands in $OUT (logs, JSON, and results.tgz with the run's metrics).
set -u
OUT=${OUT:?set OUT}
DATA=${DATA:-../shared/data/pusht/pusht_cchi_v7_replay.zarr}
PY=${PYTHON:-python3}
STEPS_TO_SCORE=${STEPS_TO_SCORE:-6000}
EVAL_EVERY=${EVAL_EVERY:-2000}
export SDL_VIDEODRIVER=dummy WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)
stage() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

stage "1. CUDA tests"
DP_PUSHT_ZARR=$DATA timeout -k 5 90 $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_train_graph.py tests/test_sampling.py -k "cuda or graph" 2>&1 | tail -15

stage "2. training throughput, state preset"
timeout -k 5 100 $PY scripts/bench_train.py --device cuda --dataset "$DATA" \
    --presets pusht_diffusion_state --variants eager graph graph+bf16 --steps 400 --warmup 100 \
    --json "$OUT/train_state.json" --keep /tmp/bench_train 2>&1 | grep -v "^run \|^done:" | tail -12

stage "3. batch-1 latency"
CKPT=$(ls -d /tmp/bench_train/pusht_diffusion_state-*/checkpoints/latest 2>/dev/null | head -1)
for backend in eager cuda_graph; do
    timeout -k 5 40 $PY scripts/bench_sampler.py "$CKPT" --latency-only --device cuda --backend $backend \
        --rows ddim:1 ddim:2 ddim:10 ddim:16 --spacings trailing --repeats 100 \
        --out "$OUT/latency_$backend" 2>&1 | tail -8
done

stage "4. time to score"
VARIANT=$($PY - "$OUT/train_state.json" <<'EOF'
import json, sys
try:
    rows = {r["variant"]: r for r in json.load(open(sys.argv[1])) if "it_s" in r}
except Exception:
    rows = {}
base = rows.get("eager")
best = "eager"
for name in ("graph", "graph+bf16"):
    r = rows.get(name)
    if not (r and base):
        continue
    common = [s for s in r["losses"] if s in base["losses"]]
    dev = sum(abs(r["losses"][s] - base["losses"][s]) / base["losses"][s] for s in common) / max(len(common), 1)
    if dev < 0.03 and r["it_s"] > rows[best]["it_s"]:
        best = name
print(best)
EOF
)
echo "variant: $VARIANT"
GRAPH=false; AMP=false
case $VARIANT in *graph*) GRAPH=true;; esac
case $VARIANT in *bf16*) AMP=true;; esac
timeout -k 10 200 $PY -m diffusion_policy.cli train pusht_diffusion_state task.dataset="$DATA" \
    run_dir=/tmp/to_score train.device=cuda train.cuda_graph=$GRAPH train.amp=$AMP \
    train.max_steps=$STEPS_TO_SCORE train.cadence.eval_every=$EVAL_EVERY train.cadence.checkpoint_every=$EVAL_EVERY \
    train.cadence.val_every=0 train.cadence.keep_best=1 train.progress=false eval.n_videos=0 2>&1 | grep -v "^eval" | tail -12
tar czf "$OUT/results.tgz" /tmp/to_score/metrics.jsonl /tmp/to_score/config.yaml \
    /tmp/to_score/eval/*/metrics.json 2>/dev/null

stage "5. training throughput, image preset"
timeout -k 5 80 $PY scripts/bench_train.py --device cuda --dataset "$DATA" \
    --presets pusht_diffusion_image --variants eager graph+bf16 --steps 150 --warmup 50 \
    --json "$OUT/train_image.json" 2>&1 | grep -v "^run \|^done:" | tail -6

stage "done"
