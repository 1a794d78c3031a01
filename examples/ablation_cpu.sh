#!/bin/bash
# Reproduce docs/results/ablation_cpu/ from scratch on a CPU machine (2 cores; 36 runs, ~40-50 min).
#
#   bash examples/ablation_cpu.sh
#
# 1. prepares the default corpus (Python stdlib .py files, sentencepiece 8k, indexed dataset; reused if present)
# 2. trains every configuration x seed one after another through pretrain_gpt_sv.py (tools/ablation.py;
#    finished runs are skipped, so rerunning continues an interrupted sweep)
# 3. measures the overhead of each strategy side by side (benchmarks/bench_scale_vectors.py, same shape)
# 4. writes tables, CSV and plots (tools/ablation_report.py)
# Environment: OUT (runs, default runs/ablation_cpu), RESULTS (default docs/results/ablation_cpu), SEEDS,
# WD_SEEDS, ITERS, DEADLINE_MIN / WD_DEADLINE_MIN (start no new run after this many minutes), DRY_RUN=1.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/ablation_cpu}"
RESULTS="${RESULTS:-docs/results/ablation_cpu}"
SEEDS="${SEEDS:-1 2 3}"
ITERS="${ITERS:-150}"
WD_SEEDS="${WD_SEEDS:-1 2 3}"
export PYTHONWARNINGS=ignore TORCHINDUCTOR_COMPILE_THREADS=1
T0=$(date +%s)

prep=$("$PYTHON" examples/prepare_default_corpus.py --out-dir runs/data/stdlib --vocab-size 8000 | tail -n 2)
DATA_PATH=$(echo "$prep" | sed -n 's/^PREFIX=//p')
TOKENIZER_MODEL=$(echo "$prep" | sed -n 's/^TOKENIZER=//p')

# 4 layers, d=128, 4 heads, seq 256, 8 sequences = 2,048 tokens per step, AdamW (wd 0.1), cosine 3e-3 -> 3e-4,
# 20 warm-up steps; single process (DP1, 2 threads). Main study: 9 configurations x SEEDS; weight-decay study on
# standard + QK-norm + post-sub-layer norms (has Output-Norms) with policies megatron / all / iwd
# (`none` coincides with `megatron` here: every decayable-or-not 1-D parameter is a scale vector).
COMMON=(--iters "$ITERS" --eval-interval 50 --eval-iters 10 --data-path "$DATA_PATH"
        --tokenizer-model "$TOKENIZER_MODEL" ${DRY_RUN:+--dry-run})
"$PYTHON" tools/ablation.py --out "$OUT" --configs none standard hg dp dnp or er unified standard+qk \
  --seeds $SEEDS "${COMMON[@]}" ${DEADLINE_MIN:+--deadline-minutes $DEADLINE_MIN}
"$PYTHON" tools/ablation.py --out "$OUT" --configs --wd-study megatron all iwd \
  --seeds $WD_SEEDS "${COMMON[@]}" ${WD_DEADLINE_MIN:+--deadline-minutes $WD_DEADLINE_MIN}
[ -n "${DRY_RUN:-}" ] && exit 0
T1=$(date +%s)

mkdir -p "$RESULTS"
"$PYTHON" benchmarks/bench_scale_vectors.py --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --num-query-groups 4 --ffn-hidden-size 384 --vocab-size 8000 --seq-length 256 --micro-batch-size 8 \
  --num-microbatches 1 --rounds 10 --warmup 2 --json "$RESULTS/overhead.json" | tee "$RESULTS/overhead.txt"
T2=$(date +%s)

"$PYTHON" tools/ablation_report.py --runs "$OUT" --out "$RESULTS" --overhead-json "$RESULTS/overhead.json" \
  --last-n 20
echo "sweep $(( (T1 - T0) / 60 )) min, overhead benchmark $(( (T2 - T1) / 60 )) min, total $(( ($(date +%s) - T0) / 60 )) min"
