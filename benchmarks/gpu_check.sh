#!/usr/bin/env bash
# GPU check of megatron_sv's backends on one GPU, sized to finish in < 8 minutes on an H100.
#   1. CUDA unit tests (pytest -m cuda): local backend on CUDA; TE backend vs local when TE is present
#   2. bf16 vs FP8 loss agreement over 50 steps, standard and unified (only with Transformer Engine)
#   3. throughput: unified vs standard (and TE vs local with TE), interleaved rounds in one process
#   4. FP8 on the local backend (torch._scaled_mm, no TE needed) vs bf16: tokens/s and peak memory at
#      0.5B and 1B shapes, standard and unified (benchmarks/bench_fp8.py, <= 4 more minutes)
# Works without Transformer Engine: then 2 prints that it is skipped and 3 measures the local backend.
# Results: stdout, and $OUT/gpu_te_check.json when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .gpu_deps ] && export PYTHONPATH=$PWD/.gpu_deps:$PYTHONPATH  # dependencies carried unpacked
export PYTHONWARNINGS=ignore
nvidia-smi -L
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" || { echo "megatron-core missing"; exit 1; }
python3 -c "from megatron_sv.scale_vectors.te_linears import transformer_engine_status as s; print('transformer engine:', s())"

echo "== CUDA unit tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests/te_backend 2>&1 | tail -15
echo "== FP8 agreement and throughput"
JSON=${OUT:+$OUT/gpu_te_check.json}
timeout 330 python3 benchmarks/gpu_te_check.py ${JSON:+--json $JSON} "$@"
echo "gpu_te_check exit code: $?"
echo "== FP8 (torch._scaled_mm) vs bf16, 0.5B and 1B"
FP8_JSON=${OUT:+$OUT/bench_fp8.json}
timeout 240 python3 benchmarks/bench_fp8.py ${FP8_JSON:+--json $FP8_JSON}
echo "bench_fp8 exit code: $?"
