#!/bin/bash
# Pre-train a GPT with scale vectors (megatron_sv).
#
# Three ways to run this one script:
#   (a) Slurm, multi-node:   MODEL=1b DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/data/tok.model \
#                            sbatch --nodes=4 examples/pretrain_gpt_sv.sh
#       srun starts one torchrun per node; the rendezvous is the job's first node
#       (scontrol show hostnames $SLURM_JOB_NODELIST). 120 s before the time limit Slurm sends SIGUSR1
#       (#SBATCH --signal=USR1@120): every rank saves a checkpoint and exits cleanly; resubmitting the
#       same command resumes from it (--load = --save).
#   (b) one machine with GPUs: bash examples/pretrain_gpt_sv.sh      (torchrun on all local GPUs)
#   (c) no GPU, no arguments: bash examples/pretrain_gpt_sv.sh
#       the embedded default: prepares the Python standard library's .py files as a corpus (sentencepiece
#       8k tokenizer + indexed dataset, under runs/data/stdlib, reused), then trains a tiny `unified` model
#       (4 layers, d=128, seq 256) on 2 gloo ranks (DP2) for 500 steps (~1M tokens)
#       with validation, and prints where the checkpoint and the TensorBoard logs are.
#
# Model presets (MODEL=...), all RMSNorm + SwiGLU + RoPE, untied embeddings, seq 2048:
#   125m   12 layers, hidden 768,  12 heads,            ffn 2048                     ~125M params (32k vocab)
#   350m   24 layers, hidden 1024, 16 heads,            ffn 2816                     ~350M
#   1b     24 layers, hidden 2048, 16 heads, 4 KV groups, ffn 5632                   ~1.2B   (TP 2)
#   moe2b  16 layers, hidden 1024, 16 heads, 16 experts top-2, expert ffn 2048       ~1.9B total, ~0.35B active (EP 8)
# Environment overrides: DATA_PATH (a --data-path blend), TOKENIZER_MODEL (sentencepiece .model), STRATEGY
# (default unified), TP, PP, EP, MBS, GBS, TRAIN_ITERS, LR, MIN_LR, WARMUP, SAVE_DIR, TB_DIR,
# GPUS_PER_NODE, MASTER_PORT, EXTRA_ARGS (appended flags), DRY_RUN=1 (print the launch command only).
#
#SBATCH --job-name=megatron_sv
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --output=megatron_sv-%j.out

set -euo pipefail

if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/pretrain_gpt_sv.py" ]; then
  REPO="${SLURM_SUBMIT_DIR}"          # sbatch copies the script away; the repo is where it was submitted
else
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
cd "$REPO"
PYTHON="${PYTHON:-python3}"
STRATEGY="${STRATEGY:-unified}"
RUN_ID="${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}"
export TORCHINDUCTOR_COMPILE_THREADS=1

run() {
  echo "+ $*"
  if [ "${DRY_RUN:-0}" != "1" ]; then "$@"; fi
}

prepare_default_data() {  # -> sets DATA_PATH / TOKENIZER_MODEL to the stdlib corpus
  local out
  out=$("$PYTHON" examples/prepare_default_corpus.py --out-dir "${DEFAULT_DATA_DIR:-$REPO/runs/data/stdlib}" \
        --vocab-size "${VOCAB:-8000}" | tee /dev/stderr)
  DATA_PATH=$(echo "$out" | sed -n 's/^PREFIX=//p')
  TOKENIZER_MODEL=$(echo "$out" | sed -n 's/^TOKENIZER=//p')
}

if [ -n "${SLURM_JOB_ID:-}" ]; then
  MODE=slurm
  GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
elif command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)" -gt 0 ]; then
  MODE=gpu
  GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | grep -c GPU)}"
else
  MODE=cpu
fi

if [ "$MODE" = cpu ]; then
  # (c) the embedded default, 2 gloo ranks on CPU
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # megatron-core warns about missing Transformer Engine / Apex on every rank; not relevant on CPU
  export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
  if [ -z "${DATA_PATH:-}" ]; then prepare_default_data; fi
  OUT="${SAVE_DIR:-$REPO/runs/cpu_default/$RUN_ID}"
  TB="${TB_DIR:-$OUT/tensorboard}"
  mkdir -p "$OUT"
  T0=$(date +%s)
  run "$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \
    --master-port "${MASTER_PORT:-29517}" pretrain_gpt_sv.py \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 256 --max-position-embeddings 256 \
    --normalization RMSNorm --swiglu --position-embedding-type rope --untie-embeddings-and-output-weights \
    --scale-vector-strategy "$STRATEGY" \
    --micro-batch-size 4 --global-batch-size 8 \
    --optimizer adam --lr "${LR:-3e-3}" --min-lr "${MIN_LR:-3e-4}" --lr-decay-style cosine \
    --lr-warmup-iters "${WARMUP:-20}" --train-iters "${TRAIN_ITERS:-500}" --weight-decay 0.1 \
    --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 --seed 1234 \
    --data-path "$DATA_PATH" --split 98,2,0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 250 \
    --log-interval 25 --eval-interval 100 --eval-iters 10 \
    --tensorboard-dir "$TB" --metrics-file "$OUT/metrics.jsonl" ${EXTRA_ARGS:-}
  echo "finished in $(( $(date +%s) - T0 )) s"
  echo "checkpoints: $OUT/checkpoints   TensorBoard: tensorboard --logdir $TB   metrics: $OUT/metrics.jsonl"
  exit 0
fi

# ---------------------------------------------------------------- GPU presets
MODEL="${MODEL:-125m}"
case "$MODEL" in
  125m)  ARCH=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 2048)
         TP_DEF=1; EP_DEF=1; LR_DEF=6e-4 ;;
  350m)  ARCH=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2816)
         TP_DEF=1; EP_DEF=1; LR_DEF=3e-4 ;;
  1b)    ARCH=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --group-query-attention
               --num-query-groups 4 --ffn-hidden-size 5632)
         TP_DEF=2; EP_DEF=1; LR_DEF=3e-4 ;;
  moe2b) ARCH=(--num-layers 16 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2816
               --num-experts 16 --moe-router-topk 2 --moe-ffn-hidden-size 2048 --moe-aux-loss-coeff 1e-2
               --moe-token-dispatcher-type alltoall)
         TP_DEF=1; EP_DEF=$(( GPUS_PER_NODE < 8 ? GPUS_PER_NODE : 8 )); LR_DEF=4e-4 ;;
  *) echo "unknown MODEL=$MODEL (choose 125m, 350m, 1b, moe2b)" >&2; exit 2 ;;
esac
TP="${TP:-$TP_DEF}"; PP="${PP:-1}"; EP="${EP:-$EP_DEF}"
if [ -z "${DATA_PATH:-}" ]; then
  echo "DATA_PATH is not set: using the Python standard library corpus (a smoke test, not a pre-training corpus)" >&2
  prepare_default_data
fi
OUT="${SAVE_DIR:-$REPO/runs/$MODEL-$STRATEGY}"   # stable across resubmissions: resume from the last checkpoint
TB="${TB_DIR:-$OUT/tensorboard}"
SP=(); if [ "$TP" -gt 1 ]; then SP=(--sequence-parallel); fi
ARGS=("${ARCH[@]}" --seq-length 2048 --max-position-embeddings 2048 --normalization RMSNorm --swiglu
  --position-embedding-type rope --untie-embeddings-and-output-weights
  --scale-vector-strategy "$STRATEGY"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  "${SP[@]}" --use-distributed-optimizer --bf16
  --micro-batch-size "${MBS:-4}" --global-batch-size "${GBS:-256}"
  --optimizer adam --lr "${LR:-$LR_DEF}" --min-lr "${MIN_LR:-3e-5}" --lr-decay-style cosine
  --lr-warmup-iters "${WARMUP:-2000}" --train-iters "${TRAIN_ITERS:-100000}" --weight-decay 0.1
  --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 --seed 1234
  --data-path $DATA_PATH --split 969,30,1 --num-workers 2
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}"
  --log-interval 10 --eval-interval 1000 --eval-iters 20
  --tensorboard-dir "$TB" --metrics-file "$OUT/metrics.jsonl" ${EXTRA_ARGS:-})

if [ "$MODE" = gpu ]; then
  # (b) all local GPUs
  run "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --master-addr 127.0.0.1 \
    --master-port "${MASTER_PORT:-29517}" pretrain_gpt_sv.py "${ARGS[@]}"
  exit 0
fi

# (a) Slurm: one torchrun per node, rendezvous on the first node of the allocation
NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29517}"
echo "Slurm job $SLURM_JOB_ID: $NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT, MODEL=$MODEL"
# torchrun itself ignores SIGUSR1 (trap ''), otherwise its default action would kill it; Slurm signals
# every process of the step, and the ranks install their own handler (save + exit).
LAUNCH="trap '' USR1; exec $PYTHON -m torch.distributed.run --nnodes $NNODES --nproc-per-node $GPUS_PER_NODE \
--node-rank \$SLURM_NODEID --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $SLURM_JOB_ID \
pretrain_gpt_sv.py $(printf '%q ' "${ARGS[@]}")"
run srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$LAUNCH"
