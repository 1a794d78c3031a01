#!/bin/bash
# Run a CPU ablation study and write its report, niced and resumable run by run.
#
#   bash examples/ablation_cpu.sh                                   # examples/studies/ablation_cpu_lr.json
#   STUDY=examples/studies/ablation_cpu_v1.json bash examples/ablation_cpu.sh   # the first study's plan
#   PLAN=1 bash examples/ablation_cpu.sh        # the runs, their state, the estimated compute; runs nothing
#   DRY_RUN=1 bash examples/ablation_cpu.sh     # print every planned run's command; runs nothing
#   mkdir -p runs && nohup bash examples/ablation_cpu.sh > runs/ablation_cpu_lr.log 2>&1 &   # in the background
#
# 1. prepares the default corpus (Python stdlib .py files, sentencepiece 8k, indexed dataset; reused if present)
#    and exports DATA_PATH / TOKENIZER_MODEL, which the study file names as ${DATA_PATH} / ${TOKENIZER_MODEL}
# 2. runs the study with `nice -n $NICE` (tools/ablation.py run): the LR sweeps first, then every later stage at
#    the LRs the sweeps chose; one run at a time. Interrupt it at any time (Ctrl-C / kill): the current run saves
#    a checkpoint; the same command continues (complete runs are skipped, a partial run resumes).
# 3. exports the small per-run logs to $RESULTS/logs (committed with the report) and writes the report from them
#    (tools/ablation_report.py): regenerate it with
#        python tools/ablation_report.py --runs $RESULTS/logs --out $RESULTS
# Environment: STUDY, OUT (runs, default runs/<study name>), RESULTS (default docs/results/<study name>),
# NICE (default 10), DEADLINE_MIN (start no new run after this many minutes), OVERHEAD=1 (also measure the
# step time and memory of the compared strategies at the 4-layer d=128 shape with benchmarks/bench_scale_vectors.py
# into $RESULTS/overhead.json/.txt, tabled by the report; needs a quiet machine), PYTHON.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
STUDY="${STUDY:-examples/studies/ablation_cpu_lr.json}"
NAME=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['name'])" "$STUDY")
OUT="${OUT:-runs/$NAME}"
RESULTS="${RESULTS:-docs/results/$NAME}"
NICE="${NICE:-10}"
export PYTHONWARNINGS=ignore TORCHINDUCTOR_COMPILE_THREADS=1

if [ -n "${PLAN:-}" ] || [ -n "${DRY_RUN:-}" ]; then
  export DATA_PATH="${DATA_PATH:-runs/data/stdlib/stdlib_text_document}"
  export TOKENIZER_MODEL="${TOKENIZER_MODEL:-runs/data/stdlib/tokenizer.model}"
  if [ -n "${PLAN:-}" ]; then exec "$PYTHON" tools/ablation.py plan "$STUDY" --out "$OUT"; fi
  exec "$PYTHON" tools/ablation.py run "$STUDY" --out "$OUT" --dry-run
fi

prep=$(nice -n "$NICE" "$PYTHON" tools/prepare_default_corpus.py --output-dir runs/data/stdlib --vocab-size 8000)
export DATA_PATH=$(sed -n 's/^DATA_PATH=//p' <<<"$prep")
export TOKENIZER_MODEL=$(sed -n 's/^TOKENIZER_MODEL=//p' <<<"$prep")
T0=$(date +%s)
rc=0
nice -n "$NICE" "$PYTHON" tools/ablation.py run "$STUDY" --out "$OUT" \
  ${DEADLINE_MIN:+--deadline-minutes "$DEADLINE_MIN"} || rc=$?
echo "study: $(( ($(date +%s) - T0) / 60 )) min in this call (rc $rc)"
[ "$rc" -eq 0 ] || exit "$rc"

mkdir -p "$RESULTS"
OVERHEAD_ARGS=()
if [ -n "${OVERHEAD:-}" ]; then  # the compared strategies at this model's shape, side by side, fp32, one process
  nice -n "$NICE" "$PYTHON" benchmarks/bench_scale_vectors.py --strategies standard none hg dnp unified \
    --precisions fp32 --ranks 1 --num-layers 4 --hidden-size 128 --num-attention-heads 4 --num-query-groups 4 \
    --ffn-hidden-size 384 --vocab-size 8000 --seq-length 256 --micro-batch-size 8 --num-microbatches 1 \
    --rounds 10 --warmup 2 --threads 2 --json "$RESULTS/overhead.json" | tee "$RESULTS/overhead.txt"
  OVERHEAD_ARGS=(--overhead-json "$RESULTS/overhead.json")
fi
"$PYTHON" tools/ablation_report.py --runs "$OUT" --out "$RESULTS" --export-logs "$RESULTS/logs" \
  "${OVERHEAD_ARGS[@]}" > /dev/null
echo "report: $RESULTS/results.md (regenerate: python tools/ablation_report.py --runs $RESULTS/logs --out $RESULTS)"
