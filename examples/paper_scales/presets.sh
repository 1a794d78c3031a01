# Model presets at the paper's scales (sourced by examples/paper_scales/pretrain_paper_scale.sh).
#
# The paper trains dense Llama-style models from 0.12B to 1B and an MoE around 2B for about 100 tokens
# per parameter [S1], with AdamW and Muon and several LR schedules including WSD [S2+]. Its exact shapes,
# vocabulary and learning rates are not known to us: the shapes below are ours [OURS], chosen to land on
# the stated sizes with a 32k vocabulary (parameter counts below assume vocab 32,000, untied embeddings);
# the learning rates are starting points for an LR sweep, not the paper's tuned values.
#
#   preset  layers hidden heads(KV)  ffn    experts      params total / non-embedding / active  seq  GBS  tokens (100/param)
#   0.12b   12     768    12         2048   -            134M / 85M / 134M                       2048 256  13.4B  -> 25,600 steps
#   0.5b    20     1280   20         3456   -            478M / 396M / 478M                      2048 512  47.8B  -> 45,600 steps
#   1b      20     2048   16 (4)     5632   -            1.03B / 0.90B / 1.03B                   2048 512  103B   -> 98,500 steps
#   moe2b   12     1280   20         -      16, top-2,   2.05B / 1.97B / 0.40B active            2048 512  40B    -> 38,100 steps
#                                           ffn 2560     (100 tokens per *active* parameter [OURS]; TOKENS_PER_PARAM,
#                                                         TRAIN_TOKENS override)
# All: RMSNorm, SwiGLU, RoPE, untied embeddings, init std 0.02, bf16, AdamW betas (0.9, 0.95), wd 0.1, clip 1.0.
#
# paper_preset NAME sets: ARCH (array of model flags), PARAMS (count used for the token budget), TP_DEF,
# EP_DEF, GBS_DEF, LR_ADAM, LR_MUON, MIN_LR_FRAC.

paper_preset() {
  case "$1" in
    0.12b) ARCH=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 2048)
           PARAMS=134000000; TP_DEF=1; EP_DEF=1; GBS_DEF=256; LR_ADAM=1.5e-3; LR_MUON=1.5e-3 ;;
    0.5b)  ARCH=(--num-layers 20 --hidden-size 1280 --num-attention-heads 20 --ffn-hidden-size 3456)
           PARAMS=478000000; TP_DEF=1; EP_DEF=1; GBS_DEF=512; LR_ADAM=1e-3; LR_MUON=1e-3 ;;
    1b)    ARCH=(--num-layers 20 --hidden-size 2048 --num-attention-heads 16 --group-query-attention
                 --num-query-groups 4 --ffn-hidden-size 5632)
           PARAMS=1033000000; TP_DEF=2; EP_DEF=1; GBS_DEF=512; LR_ADAM=6e-4; LR_MUON=6e-4 ;;
    moe2b) ARCH=(--num-layers 12 --hidden-size 1280 --num-attention-heads 20
                 --num-experts 16 --moe-router-topk 2 --moe-ffn-hidden-size 2560 --moe-aux-loss-coeff 1e-2
                 --moe-token-dispatcher-type alltoall)
           PARAMS=397000000; TP_DEF=1; EP_DEF=8; GBS_DEF=512; LR_ADAM=8e-4; LR_MUON=8e-4 ;;
    *) echo "unknown paper preset '$1' (choose 0.12b, 0.5b, 1b, moe2b)" >&2; return 2 ;;
  esac
  MIN_LR_FRAC=0.1
}
