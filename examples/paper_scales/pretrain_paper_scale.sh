#!/bin/bash
# Pre-train at the paper's scales on a GPU cluster: presets in examples/paper_scales/presets.sh.
#
#   MODEL=0.5b OPT=muon SCHED=wsd STRATEGY=unified DATA_PATH=... TOKENIZER_MODEL=... \
#       sbatch --nodes=4 examples/paper_scales/pretrain_paper_scale.sh        # Slurm, multi-node
#   MODEL=0.12b bash examples/paper_scales/pretrain_paper_scale.sh            # all local GPUs
#   MODEL=1b OPT=adam SCHED=cosine DRY_RUN=1 bash examples/paper_scales/pretrain_paper_scale.sh   # print only
#
# Same launch modes and flags as examples/pretrain_gpt_sv.sh (its GPU presets stay as they are); this script
# adds the paper's sizes, a token budget of TOKENS_PER_PARAM (default 100) tokens per parameter, the
# optimizer (OPT=adam|muon) and the schedule (SCHED=cosine|wsd; WSD decays over the last WSD_FRAC, default 0.2).
# A paired comparison (e.g. STRATEGY=standard vs unified, and standard + EXTRA_ARGS=--qk-layernorm as the
# QK-norm control) uses the same SEED and the same data. A whole study (LR sweeps, paired seeds at each
# configuration's best LR, compute efficiency, weight decay) submits this script once per run:
#   python tools/ablation.py submit examples/paper_scales/study_0.12b.json --out runs/paper_0.12b   (DRY_RUN=1 first)
# see examples/paper_scales/README.md.
# Environment: MODEL, STRATEGY (default unified), OPT, SCHED, SEED, DATA_PATH, TOKENIZER_MODEL, TP, PP, EP,
# MBS, GBS, SEQ, LR, MIN_LR, WARMUP, TOKENS_PER_PARAM, TRAIN_TOKENS, TRAIN_ITERS, SAVE_DIR, TB_DIR,
# GPUS_PER_NODE, MASTER_PORT, EXTRA_ARGS, DRY_RUN=1.
# Muon: megatron-core 0.16.1's Muon needs the 'emerging-optimizers' package and no distributed optimizer;
# it uses one LR for the Muon (matrices) and Adam (embeddings, output layer, scale vectors) parts.
#
#SBATCH --job-name=megatron_sv_paper
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --output=megatron_sv_paper-%j.out
set -euo pipefail

if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/pretrain_gpt_sv.py" ]; then
  REPO="${SLURM_SUBMIT_DIR}"
else
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fi
cd "$REPO"
source examples/paper_scales/presets.sh
PYTHON="${PYTHON:-python3}"
MODEL="${MODEL:-0.12b}"; STRATEGY="${STRATEGY:-unified}"; OPT="${OPT:-adam}"; SCHED="${SCHED:-cosine}"
paper_preset "$MODEL"

if [ -n "${SLURM_JOB_ID:-}" ]; then
  MODE=slurm; GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"; NNODES="${SLURM_NNODES:-1}"
else
  MODE=local; NNODES=1
  GPUS_PER_NODE="${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)}"
  if [ "${GPUS_PER_NODE:-0}" -eq 0 ]; then
    if [ "${DRY_RUN:-0}" = 1 ]; then GPUS_PER_NODE=8; else
      echo "no GPU found: the paper-scale presets need GPUs (CPU: bash examples/ablation_cpu.sh)" >&2; exit 2; fi
  fi
fi
WORLD=$(( NNODES * GPUS_PER_NODE ))
TP="${TP:-$TP_DEF}"; PP="${PP:-1}"
EP="${EP:-$(( EP_DEF < WORLD ? EP_DEF : WORLD ))}"
SEQ="${SEQ:-2048}"; GBS="${GBS:-$GBS_DEF}"; MBS="${MBS:-4}"
TOKENS_PER_PARAM="${TOKENS_PER_PARAM:-100}"
TRAIN_TOKENS="${TRAIN_TOKENS:-$(( PARAMS * TOKENS_PER_PARAM ))}"
TRAIN_ITERS="${TRAIN_ITERS:-$(( (TRAIN_TOKENS + GBS * SEQ - 1) / (GBS * SEQ) ))}"
WARMUP="${WARMUP:-$(( TRAIN_ITERS / 100 > 2000 ? 2000 : TRAIN_ITERS / 100 ))}"
case "$OPT" in
  adam) LR="${LR:-$LR_ADAM}"; OPT_ARGS=(--optimizer adam --use-distributed-optimizer --overlap-grad-reduce
                                       --overlap-param-gather) ;;
  muon) LR="${LR:-$LR_MUON}"; OPT_ARGS=(--optimizer muon --overlap-grad-reduce) ;;
  *) echo "OPT must be adam or muon" >&2; exit 2 ;;
esac
MIN_LR="${MIN_LR:-$(python3 -c "print('%g' % ($LR * $MIN_LR_FRAC))")}"
case "$SCHED" in
  cosine) SCHED_ARGS=(--lr-decay-style cosine) ;;
  wsd) SCHED_ARGS=(--lr-decay-style wsd --lr-wsd-decay-style linear
                   --lr-wsd-decay-iters "$(python3 -c "print(int($TRAIN_ITERS * ${WSD_FRAC:-0.2}))")") ;;
  *) echo "SCHED must be cosine or wsd" >&2; exit 2 ;;
esac
if [ -z "${DATA_PATH:-}" ] || [ -z "${TOKENIZER_MODEL:-}" ]; then
  if [ "${DRY_RUN:-0}" = 1 ]; then DATA_PATH="${DATA_PATH:-/data/corpus_text_document}"
    TOKENIZER_MODEL="${TOKENIZER_MODEL:-/data/tokenizer.model}"
  else echo "set DATA_PATH (a --data-path blend) and TOKENIZER_MODEL (sentencepiece .model)" >&2; exit 2; fi
fi
OUT="${SAVE_DIR:-$REPO/runs/paper-$MODEL-$STRATEGY-$OPT-$SCHED-seed${SEED:-1234}}"
TB="${TB_DIR:-$OUT/tensorboard}"
SP=(); if [ "$TP" -gt 1 ]; then SP=(--sequence-parallel); fi
ARGS=("${ARCH[@]}" --seq-length "$SEQ" --max-position-embeddings "$SEQ" --normalization RMSNorm --swiglu
  --position-embedding-type rope --untie-embeddings-and-output-weights --scale-vector-strategy "$STRATEGY"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  "${SP[@]}" --bf16 --micro-batch-size "$MBS" --global-batch-size "$GBS"
  "${OPT_ARGS[@]}" --lr "$LR" --min-lr "$MIN_LR" "${SCHED_ARGS[@]}"
  --lr-warmup-iters "$WARMUP" --train-iters "$TRAIN_ITERS" --weight-decay 0.1
  --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 --seed "${SEED:-1234}"
  --data-path $DATA_PATH --split 969,30,1 --num-workers 2
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}"
  --log-interval 10 --eval-interval 1000 --eval-iters 20
  --tensorboard-dir "$TB" --metrics-file "$OUT/metrics.jsonl" ${EXTRA_ARGS:-})
echo "paper preset $MODEL: ~$PARAMS params counted for the budget, $TRAIN_TOKENS tokens = $TRAIN_ITERS steps x" \
     "$GBS x $SEQ; $OPT, $SCHED, LR $LR -> $MIN_LR, warmup $WARMUP; TP $TP PP $PP EP $EP on $WORLD GPUs" >&2

source examples/launch.sh   # local torchrun, or one torchrun per node under Slurm (signals, rendezvous)
launch_training "$GPUS_PER_NODE" "${ARGS[@]}"
