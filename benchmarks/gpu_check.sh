#!/usr/bin/env bash
# GPU check of megatron_sv on one GPU WITHOUT Transformer Engine, sized to finish in < 8 minutes (H100/H200):
#   1. parity demo: examples/parity_demo.py (Megatron-Core's layers, fp32) on the GPU at TP1 and on the CPU at
#      TP1 and TP2 (gloo): the same per-step losses
#   2. bf16 step time and torch.cuda.max_memory_allocated at the 0.12B and 0.5B shapes (seq 2048, 4 micro-batches,
#      distributed optimizer): unified vs standard vs Megatron-Core's own local spec, interleaved rounds, median
#      ratios with 95% intervals (benchmarks/bench_scale_vectors.py, the training loop's own code)
#   3. FP8 (our torch._scaled_mm linears, no TE needed) vs bf16: tokens/s and peak memory, standard and unified,
#      tensorwise and rowwise (benchmarks/bench_fp8.py), at 0.5B and, if time is left, 1B
#   4. if time is left: the CUDA unit tests (pytest -m cuda)
# A machine with Transformer Engine: python benchmarks/gpu_te_check.py (TE bf16/FP8 vs the local backend).
# Needs torch with CUDA and Triton (torch.compile builds DNP's fused kernels with it). megatron-core and our other
# dependencies come from wheels in .whl/ when it is not installed; fill .whl/ on a machine with network access:
#     bash benchmarks/gpu_check.sh --fetch-wheels [PYTHON_VERSION, default 3.12]
# and bring .whl/ along (it is git-ignored). Results: stdout, and under $OUT when set: parity.txt,
# bench_0.12b.{md,json}, bench_0.5b.{md,json}, bench_fp8_0.5b.json, bench_fp8_1b.json.
#     bash benchmarks/gpu_check.sh              # on the GPU machine
#     bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU at tiny shapes (checks the script only)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

megatron_core_pin() {  # the tested megatron-core for a Python version (setup.py)
  case "$1" in 3.11) echo "megatron-core==0.16.1" ;; *) echo "megatron-core==0.19.2" ;; esac
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  PYV=${2:-3.12}
  mkdir -p .whl
  python3 -m pip download -q --only-binary=:all: --no-deps --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "$(megatron_core_pin "$PYV")" "packaging>=24.2" sentencepiece psutil \
    && ls .whl
  exit $?
fi
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1

BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole script, setup included
DEADLINE=$((SECONDS + BUDGET_S))
# run_section NAME LIMIT_S CMD...: runs CMD under a timeout of min(LIMIT_S, time left); skips it when < 20 s are left
run_section() {
  local name=$1 limit=$2 left; shift 2
  left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (time budget of ${BUDGET_S} s spent)"
    return 0
  fi
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "$name: timed out after ${limit} s"
  echo "$name: exit code $rc"
  return 0
}

# -- setup ---------------------------------------------------------------------------------------------------
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import megatron.core" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    # --no-deps: keep the machine's torch (and its CUDA build) as it is
    python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl \
      || echo "wheel install failed"
    export PYTHONPATH=/tmp/gpu_check_site:$PYTHONPATH
  elif [ -d .gpu_deps ]; then
    export PYTHONPATH=$ROOT/.gpu_deps:$PYTHONPATH  # dependencies carried unpacked
  else
    echo "megatron-core is not installed and .whl/ holds no wheels (see --fetch-wheels)"; exit 1
  fi
fi
export PYTHONWARNINGS=ignore
if [ "$DRY_RUN" = 1 ]; then
  echo "DRY RUN on CPU at tiny shapes: checks the script, the figures mean nothing"
  export CUDA_VISIBLE_DEVICES=""
else
  nvidia-smi -L || { echo "no GPU visible (use --dry-run to check the script on CPU)"; exit 1; }
fi
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null \
  || echo "triton: not installed (on a GPU, DNP's fused kernels then run eagerly)"
python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" || { echo "megatron-core missing"; exit 1; }
python3 -c "from megatron_sv.scale_vectors.te_linears import transformer_engine_status as s; print('transformer engine:', s())"
RESULTS=${OUT:-$(mktemp -d)}
mkdir -p "$RESULTS"

# -- 1. parity demo --------------------------------------------------------------------------------------------
parity() {
  local gpu_log=$RESULTS/parity_gpu.txt cpu1_log=$RESULTS/parity_cpu_tp1.txt cpu2_log=$RESULTS/parity_cpu_tp2.txt
  python3 examples/parity_demo.py --steps 5 | tee "$gpu_log"
  CUDA_VISIBLE_DEVICES="" python3 examples/parity_demo.py --steps 5 > "$cpu1_log"
  CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2 python3 -m torch.distributed.run --nproc-per-node 2 \
    --master-addr 127.0.0.1 --master-port 29531 examples/parity_demo.py --steps 5 > "$cpu2_log"
  python3 - "$gpu_log" "$cpu1_log" "$cpu2_log" <<'EOF' | tee "$RESULTS/parity.txt"; return "${PIPESTATUS[0]}"
import re, sys
runs = [[float(m) for m in re.findall(r"loss (\S+)", open(p).read())] for p in sys.argv[1:]]
names = ["default device TP1", "CPU TP1", "CPU TP2"]
for n, r in zip(names, runs):
    print(f"{n:<20} " + " ".join(f"{x:.6f}" for x in r))
if not all(len(r) == len(runs[0]) > 0 for r in runs):
    sys.exit("parity: a run printed no or fewer losses")
diff = max(abs(a - b) for r in runs[1:] for a, b in zip(runs[0], r))
print(f"max |loss difference| across the three runs: {diff:.2e} ({'OK' if diff < 1e-4 else 'MISMATCH'}, bound 1e-4)")
sys.exit(0 if diff < 1e-4 else 1)
EOF
}
export -f parity; export RESULTS  # timeout runs programs, not shell functions
run_section "parity demo (fp32): GPU TP1 vs CPU TP1 and TP2" 90 bash -c parity

# -- 2. step time and memory: unified vs standard vs Megatron-Core ------------------------------------------------
# 0.12B and 0.5B shapes from examples/paper_scales/presets.sh (vocab 32,000)
SHAPE_012B=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --num-query-groups 12 --ffn-hidden-size 2048
            --vocab-size 32000)
SHAPE_05B=(--num-layers 20 --hidden-size 1280 --num-attention-heads 20 --num-query-groups 20 --ffn-hidden-size 3456
           --vocab-size 32000)
BENCH=(python3 benchmarks/bench_scale_vectors.py --precisions bf16 --ranks 1 --strategies standard unified megatron-ref
       --seq-length 2048 --micro-batch-size 1 --num-microbatches 4 --rounds 10 --warmup 2)
if [ "$DRY_RUN" = 1 ]; then
  SHAPE_012B=(--quick --num-layers 2); SHAPE_05B=(--quick --num-layers 3)
  BENCH=(python3 benchmarks/bench_scale_vectors.py --precisions bf16 --ranks 1 --strategies standard unified megatron-ref
         --rounds 2 --warmup 1)
fi
run_section "bf16 0.12B: unified vs standard vs Megatron-Core local spec" 150 \
  "${BENCH[@]}" "${SHAPE_012B[@]}" --out "$RESULTS/bench_0.12b"
run_section "bf16 0.5B: unified vs standard vs Megatron-Core local spec" 180 \
  "${BENCH[@]}" "${SHAPE_05B[@]}" --out "$RESULTS/bench_0.5b"

# -- 3. FP8 vs bf16 (benchmarks/bench_fp8.py), one shape per section so that a late timeout keeps the first --------
if [ "$DRY_RUN" = 1 ]; then
  run_section "FP8 script smoke run on CPU (tiny)" 120 python3 benchmarks/bench_fp8.py --shapes tiny --rounds 1 \
    --json "$RESULTS/bench_fp8_tiny.json"
else
  for shape in 0.5b 1b; do
    run_section "FP8 vs bf16 at $shape (bench_fp8.py)" 150 python3 benchmarks/bench_fp8.py --shapes "$shape" \
      --json "$RESULTS/bench_fp8_$shape.json"
  done
fi

# -- 4. CUDA unit tests, with what is left -----------------------------------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
  run_section "CUDA unit tests" 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/te_backend
fi
echo "gpu_check done in ${SECONDS} s; results in $RESULTS"
