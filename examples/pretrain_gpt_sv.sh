#!/bin/bash
# Pre-train a GPT with scale vectors (megatron_sv): one script for a Slurm cluster, a GPU machine or a CPU.
#
# Where it runs:
#   Slurm (inside a job, i.e. under sbatch): srun starts one torchrun per node, the rendezvous is the job's
#       first node (first host of $SLURM_JOB_NODELIST). Submit from the repository root (sbatch runs a copy of
#       this script; the repository is $SLURM_SUBMIT_DIR):
#         MODEL=1b DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/data/tok.model \
#             sbatch --nodes=4 examples/pretrain_gpt_sv.sh
#       Preemption: Slurm sends SIGUSR1 120 s before the time limit (#SBATCH --signal=USR1@120); `scancel
#       --signal=USR1 JOB`, plain `scancel JOB`, the time limit itself (SIGTERM) and `scontrol requeue JOB` work
#       the same way: every rank saves a checkpoint of the current iteration and exits; resubmitting the same
#       command (or the requeued job, submitted with --requeue) resumes from it, because --load = --save
#       (SAVE_DIR, stable across submissions). The exit save must fit in the cluster's KillWait after SIGTERM.
#   Otherwise: one torchrun on this machine (all local GPUs, or 2 gloo ranks on CPU).
# On what (DEVICE=auto|gpu|cpu, auto: gpu when nvidia-smi lists GPUs on the node that runs this script):
#   gpu: MODEL=125m|350m|1b|moe2b (default 125m), bf16 with the distributed optimizer, seq 2048,
#        NPROC_PER_NODE (alias GPUS_PER_NODE; default: the node's GPUs) ranks per node
#   cpu: MODEL=tiny, fp32, NPROC_PER_NODE (default 2) gloo ranks per node. Without arguments this is the
#        embedded default: the Python standard library's .py files become the corpus (sentencepiece 8k
#        tokenizer + indexed dataset under runs/data/stdlib, built once by tools/prepare_default_corpus.py),
#        then a 4-layer, d=128, seq 256 `unified` model trains for 500 steps (~1M tokens) with validation.
#   On CPU inside a Slurm job (sbatch --gpus-per-node=0 --cpus-per-task=N ...) the ranks are gloo ranks
#   launched exactly as on a GPU cluster. That is how this script is tested (tests/slurm: a real Slurm 22.05,
#   slurmctld and two slurmd on one host): a complete run whose checkpoint loads; the time limit's USR1,
#   scancel --signal=USR1 and plain scancel, each resumed by the same command with the losses of an
#   uninterrupted run; scontrol requeue of a --requeue job, which resumes by itself; --nodes=2 with one rank
#   per node (rendezvous on the first node) matching one node with two ranks. Not tested here: GPUs/NCCL and
#   nodes on separate hosts (the output directory must be on a file system that every node sees).
#
# Model presets (MODEL=...), all RMSNorm + SwiGLU + RoPE, untied embeddings:
#   tiny   NUM_LAYERS (4) layers, HIDDEN_SIZE (128), NUM_HEADS (4) heads, SEQ_LENGTH (256)   (CPU default)
#   125m   12 layers, hidden 768,  12 heads,            ffn 2048                     ~125M params (32k vocab)
#   350m   24 layers, hidden 1024, 16 heads,            ffn 2816                     ~350M
#   1b     24 layers, hidden 2048, 16 heads, 4 KV groups, ffn 5632                   ~1.2B   (TP 2)
#   moe2b  16 layers, hidden 1024, 16 heads, 16 experts top-2, expert ffn 2048       ~1.9B total, ~0.35B active (EP 8)
# Environment overrides: DATA_PATH (a --data-path blend; unset: the stdlib corpus, with VOCAB (8000),
#   CORPUS_MAX_BYTES (all) and DEFAULT_DATA_DIR (runs/data/stdlib)), TOKENIZER_MODEL (sentencepiece .model),
#   STRATEGY (default unified), TP, PP, EP, MBS, GBS, LR, MIN_LR, LR_DECAY_STYLE (cosine), WARMUP,
#   TRAIN_ITERS, SAVE_INTERVAL, LOG_INTERVAL, EVAL_INTERVAL, EVAL_ITERS, SAVE_DIR (checkpoints, metrics.jsonl,
#   TensorBoard), TB_DIR, NPROC_PER_NODE, MASTER_PORT (local: 29517; Slurm: 20000 + job id mod 10000), PYTHON, EXTRA_ARGS (appended flags; a later flag wins),
#   DRY_RUN=1 (print the launch command only).
# Exit status: the trainer's (0 done or saved on a signal; 2 a bad argument or checkpoint, printed as the
# last line; 3 diverged); a bad DEVICE/MODEL here exits 2 before anything starts.
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
source examples/launch.sh
PYTHON="${PYTHON:-python3}"
STRATEGY="${STRATEGY:-unified}"
export TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "examples/pretrain_gpt_sv.sh: error: $*" >&2; exit 2; }

DEVICE="${DEVICE:-auto}"
if [ "$DEVICE" = auto ]; then
  if [ "$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)" -gt 0 ]; then DEVICE=gpu; else DEVICE=cpu; fi
fi
case "$DEVICE" in
  gpu) MODEL="${MODEL:-125m}"
       NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)
       NPROC_PER_NODE="${NPROC_PER_NODE:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$NGPU}}}"
       if [ "$NPROC_PER_NODE" -eq 0 ]; then
         if [ "${DRY_RUN:-0}" = 1 ]; then NPROC_PER_NODE=8; else die "DEVICE=gpu but no GPU found"; fi
       fi ;;
  cpu) MODEL="${MODEL:-tiny}"; NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
       # megatron-core warns about missing Transformer Engine / Apex on every rank; not relevant on CPU
       export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}" ;;
  *) die "DEVICE=$DEVICE (choose auto, gpu or cpu)" ;;
esac
if [ "$DEVICE" = cpu ] && [ "$MODEL" != tiny ]; then die "MODEL=$MODEL needs GPUs; on CPU use MODEL=tiny"; fi

# Output: stable under Slurm and for the GPU presets (resubmitting resumes); one directory per run for the
# local CPU default.
if [ "$MODEL" = tiny ] && [ -z "${SLURM_JOB_ID:-}" ]; then
  OUT="${SAVE_DIR:-$REPO/runs/cpu_default/$(date +%Y%m%d-%H%M%S)}"
else
  OUT="${SAVE_DIR:-$REPO/runs/$MODEL-$STRATEGY}"
fi
TB="${TB_DIR:-$OUT/tensorboard}"

if [ -z "${DATA_PATH:-}" ]; then
  [ "$MODEL" = tiny ] || echo "DATA_PATH is not set: using the Python standard library corpus" \
                             "(a smoke test, not a pre-training corpus)" >&2
  # progress goes to stderr as it happens; stdout carries only DATA_PATH=... / TOKENIZER_MODEL=...
  prep=$("$PYTHON" tools/prepare_default_corpus.py --output-dir "${DEFAULT_DATA_DIR:-$REPO/runs/data/stdlib}" \
         --vocab-size "${VOCAB:-8000}" ${CORPUS_MAX_BYTES:+--max-bytes "$CORPUS_MAX_BYTES"})
  DATA_PATH=$(sed -n 's/^DATA_PATH=//p' <<<"$prep")
  TOKENIZER_MODEL=$(sed -n 's/^TOKENIZER_MODEL=//p' <<<"$prep")
  echo "data: $DATA_PATH  tokenizer: $TOKENIZER_MODEL"
fi
[ -n "${TOKENIZER_MODEL:-}" ] || die "DATA_PATH is set but TOKENIZER_MODEL (sentencepiece .model) is not"

case "$MODEL" in
  tiny)  SEQ="${SEQ_LENGTH:-256}"
         ARCH=(--num-layers "${NUM_LAYERS:-4}" --hidden-size "${HIDDEN_SIZE:-128}"
               --num-attention-heads "${NUM_HEADS:-4}")
         TP_DEF=1; EP_DEF=1; LR_DEF=3e-3; MIN_LR_DEF=3e-4; WARMUP_DEF=20; ITERS_DEF=500; MBS_DEF=4; GBS_DEF=8
         SAVE_DEF=250; LOG_DEF=25; EVAL_INT_DEF=100; EVAL_ITERS_DEF=10; SPLIT=98,2,0
         PRECISION=() ;;
  125m|350m|1b|moe2b)
         SEQ=2048; LR_DEF=3e-4; MIN_LR_DEF=3e-5; WARMUP_DEF=2000; ITERS_DEF=100000; MBS_DEF=4; GBS_DEF=256
         SAVE_DEF=1000; LOG_DEF=10; EVAL_INT_DEF=1000; EVAL_ITERS_DEF=20; SPLIT=969,30,1
         PRECISION=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --bf16)
         TP_DEF=1; EP_DEF=1 ;;&
  125m)  ARCH=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 2048); LR_DEF=6e-4 ;;
  350m)  ARCH=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2816) ;;
  1b)    ARCH=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --group-query-attention
               --num-query-groups 4 --ffn-hidden-size 5632)
         TP_DEF=2 ;;
  moe2b) ARCH=(--num-layers 16 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2816
               --num-experts 16 --moe-router-topk 2 --moe-ffn-hidden-size 2048 --moe-aux-loss-coeff 1e-2
               --moe-token-dispatcher-type alltoall)
         EP_DEF=$(( NPROC_PER_NODE < 8 ? NPROC_PER_NODE : 8 )); LR_DEF=4e-4 ;;
  *) die "unknown MODEL=$MODEL (choose tiny, 125m, 350m, 1b, moe2b)" ;;
esac
TP="${TP:-$TP_DEF}"; PP="${PP:-1}"; EP="${EP:-$EP_DEF}"
SP=(); if [ "$TP" -gt 1 ]; then SP=(--sequence-parallel); fi
[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$OUT"
ARGS=("${ARCH[@]}" --seq-length "$SEQ" --max-position-embeddings "$SEQ" --normalization RMSNorm --swiglu
  --position-embedding-type rope --untie-embeddings-and-output-weights
  --scale-vector-strategy "$STRATEGY"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  "${SP[@]}" "${PRECISION[@]}"
  --micro-batch-size "${MBS:-$MBS_DEF}" --global-batch-size "${GBS:-$GBS_DEF}"
  --optimizer adam --lr "${LR:-$LR_DEF}" --min-lr "${MIN_LR:-$MIN_LR_DEF}" --lr-decay-style "${LR_DECAY_STYLE:-cosine}"
  --lr-warmup-iters "${WARMUP:-$WARMUP_DEF}" --train-iters "${TRAIN_ITERS:-$ITERS_DEF}" --weight-decay 0.1
  --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 --seed 1234
  --data-path $DATA_PATH --split "$SPLIT"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval "${SAVE_INTERVAL:-$SAVE_DEF}"
  --log-interval "${LOG_INTERVAL:-$LOG_DEF}" --eval-interval "${EVAL_INTERVAL:-$EVAL_INT_DEF}"
  --eval-iters "${EVAL_ITERS:-$EVAL_ITERS_DEF}"
  --tensorboard-dir "$TB" --metrics-file "$OUT/metrics.jsonl" ${EXTRA_ARGS:-})

echo "MODEL=$MODEL STRATEGY=$STRATEGY on $DEVICE, $NPROC_PER_NODE ranks per node; output in $OUT"
T0=$(date +%s)
launch_training "$NPROC_PER_NODE" "${ARGS[@]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
echo "finished in $(( $(date +%s) - T0 )) s"
echo "checkpoints: $OUT/checkpoints   TensorBoard: tensorboard --logdir $TB   metrics: $OUT/metrics.jsonl"
