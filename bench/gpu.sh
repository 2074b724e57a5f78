#!/usr/bin/env bash
# Every GPU-side check and benchmark in one command, for one call on a lent CUDA machine (which has
# torch and triton but no vLLM: the benchmarks then time vLLM's top-p/min-p as plain-torch copies and
# say so). Results go to $OUT (default bench-results/gpu); each step has its own time limit so that
# one hang cannot eat the lease.
#
#   bash bench/gpu.sh                 # on the device: about 5 minutes on an H200
#   LEANSERVE_GPU_QUICK=1 bash bench/gpu.sh   # small sizes, also runs on CPU (to test this script)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench-results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS CMD...: run, log to $OUT/NAME.log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" = 0 ] || status=1
}

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>/dev/null \
    | tee -a "$OUT/versions.txt"

if [ -n "${LEANSERVE_GPU_QUICK:-}" ]; then
    step top_h 300 $PY -m kernels.top_h.bench --check --sizes 1x3000,4x5000 --out "$OUT/top_h.json"
    step sparse24 300 $PY -m kernels.sparse24.bench --sizes small --out "$OUT/sparse24.json"
    step retention 300 $PY -m kernels.retention.bench --quick --check --out "$OUT/retention.json"
    step bounded_kv 300 $PY -m kernels.vllm_plugin.bounded_kv.bench_gpu --quick --out "$OUT/bounded_kv.json"
    exit $status
fi

# Top-H: kept sets vs the CPU torch path (float64 entropy) and time per call vs sort-based top-p / min-p.
step top_h 200 $PY -m kernels.top_h.bench --check \
    --sizes 1x32000,64x32000,256x32000,1x152064,64x152064,256x152064 --out "$OUT/top_h.json"
step top_h_bf16 100 $PY -m kernels.top_h.bench --check --dtype bfloat16 \
    --sizes 1x152064,256x152064 --out "$OUT/top_h_bf16.json"
# 2:4 GEMM: ours (GEMV and tl.dot paths) vs cuBLAS dense and cuSPARSELt, (N, K) x M grid, with errors; plus an
# ARMOR row per point (block-diagonal wrappers b = 128 around the same 2:4 kernel) vs dense and plain 2:4.
step sparse24 360 $PY -m kernels.sparse24.bench --out "$OUT/sparse24.json"
# Retention: ring compaction (Triton) vs batched torch topk + gather; capacity sum vs materialised T x T.
step retention 150 $PY -m kernels.retention.bench --check --out "$OUT/retention.json"
# Bounded KV: one Llama-3-8B-shaped decode layer (GEMMs + gate + attention), ring C = 1024 + 128 vs full
# KV at 8K-32K, batch 4, compaction amortised; the step-time ratio is the decode-throughput ratio.
step bounded_kv 120 $PY -m kernels.vllm_plugin.bounded_kv.bench_gpu --out "$OUT/bounded_kv.json"
exit $status
