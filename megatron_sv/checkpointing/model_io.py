"""Model-only checkpoint helpers for tools (conversion): the model's shape and scale-vector strategy as
recorded in a checkpoint's saved args, and the args a converted checkpoint must carry so that
``pretrain_gpt_sv.py --load DIR --finetune`` (or ``--no-load-optim``) accepts it.

The training entry point saves ``args`` (plain types, see training.arguments.args_for_checkpoint) in the
common state of every checkpoint; these helpers read and write the same keys without importing the
training package (imports point down: tools -> conversion -> checkpointing).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from megatron_sv.checkpointing.layout import CheckpointError, checkpoint_dir, read_tracker

# The saved-args keys that define the model (training.arguments.MODEL_DEFINING_ARGS) plus the ones the
# model builder needs; a converted checkpoint records all of them.
SHAPE_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "seq_length", "max_position_embeddings", "normalization", "norm_epsilon", "swiglu",
    "position_embedding_type", "rotary_base", "untie_embeddings_and_output_weights", "qk_layernorm",
    "sv_post_sublayer_norm", "init_method_std", "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_token_dispatcher_type", "moe_aux_loss_coeff", "padded_vocab_size",
)
SV_KEYS = ("scale_vector_strategy", "sv_branch_specific", "sv_placement", "sv_reparam",
           "sv_weight_decay_policy", "sv_final_norm_role")
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def read_checkpoint_args(root: str) -> Tuple[int, Dict[str, Any]]:
    """(iteration, saved args) of the checkpoint the tracker in ``root`` names. Raises CheckpointError
    when there is none or it carries no model args."""
    from megatron_sv.checkpointing.dist import load_common

    if not os.path.isdir(root):
        raise CheckpointError(f"{root!r} does not exist or is not a directory")
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"{root!r} has no latest_checkpointed_iteration.txt (not a megatron_sv checkpoint)")
    common = load_common(root, iteration)
    args = common.get("args")
    if not isinstance(args, dict) or "num_layers" not in args:
        raise CheckpointError(f"{checkpoint_dir(root, iteration)} carries no model args (saved by another tool?)")
    return iteration, args


def load_common_state(root: str, iteration: int) -> Dict[str, Any]:
    from megatron_sv.checkpointing.dist import load_common

    return load_common(root, iteration)


def shape_from_args(args: Dict[str, Any]):
    """The GPTShape a checkpoint was made with (the same mapping as the training entry point)."""
    from megatron_sv.models.gpt.model import GPTShape

    a = dict(args)
    if a.get("padded_vocab_size") is None:
        raise CheckpointError("the checkpoint's args have no padded_vocab_size")
    gqa = a.get("group_query_attention") and a.get("num_query_groups")
    return GPTShape(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], num_attention_heads=a["num_attention_heads"],
        vocab_size=a["padded_vocab_size"], seq_length=a["seq_length"], ffn_hidden_size=a.get("ffn_hidden_size"),
        num_query_groups=a["num_query_groups"] if gqa else None,
        max_position_embeddings=a.get("max_position_embeddings"),
        normalization=a.get("normalization", "RMSNorm"), norm_epsilon=a.get("norm_epsilon", 1e-5),
        swiglu=bool(a.get("swiglu", True)), position_embedding_type=a.get("position_embedding_type", "rope"),
        rotary_base=a.get("rotary_base", 10000),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights", False)),
        qk_layernorm=bool(a.get("qk_layernorm", False)),
        post_sublayer_norm=bool(a.get("sv_post_sublayer_norm", False)),
        init_method_std=a.get("init_method_std", 0.02), num_experts=a.get("num_experts"),
        moe_router_topk=a.get("moe_router_topk", 2), moe_ffn_hidden_size=a.get("moe_ffn_hidden_size"),
        moe_token_dispatcher_type=a.get("moe_token_dispatcher_type", "allgather"),
        moe_aux_loss_coeff=a.get("moe_aux_loss_coeff", 0.0),
    )


def sv_config_from_args(args: Dict[str, Any]):
    from megatron_sv.scale_vectors.config import strategy_config

    return strategy_config(
        args.get("scale_vector_strategy", "standard"), branch_specific=args.get("sv_branch_specific"),
        placement=args.get("sv_placement"), reparam=args.get("sv_reparam"),
        weight_decay_policy=args.get("sv_weight_decay_policy"), final_norm_role=args.get("sv_final_norm_role"))


def args_for_model(shape, strategy: str, sv_overrides: Optional[Dict[str, Any]] = None,
                   layout: Optional[Dict[str, int]] = None, **extra) -> Dict[str, Any]:
    """Saved args (plain types) describing ``shape`` and the strategy, in the training CLI's names."""
    ov = sv_overrides or {}
    gqa = shape.num_query_groups is not None and shape.num_query_groups != shape.num_attention_heads
    out: Dict[str, Any] = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.resolved_ffn_hidden_size(),
        num_attention_heads=shape.num_attention_heads, group_query_attention=gqa,
        num_query_groups=shape.num_query_groups if gqa else None, seq_length=shape.seq_length,
        max_position_embeddings=shape.max_position_embeddings or shape.seq_length,
        normalization=shape.normalization, norm_epsilon=shape.norm_epsilon, swiglu=shape.swiglu,
        position_embedding_type=shape.position_embedding_type, rotary_base=shape.rotary_base,
        untie_embeddings_and_output_weights=shape.untie_embeddings_and_output_weights,
        qk_layernorm=shape.qk_layernorm, sv_post_sublayer_norm=shape.post_sublayer_norm,
        init_method_std=shape.init_method_std, num_experts=shape.num_experts,
        moe_router_topk=shape.moe_router_topk, moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        moe_token_dispatcher_type=shape.moe_token_dispatcher_type, moe_aux_loss_coeff=shape.moe_aux_loss_coeff,
        padded_vocab_size=shape.vocab_size, scale_vector_strategy=strategy,
        sv_branch_specific=ov.get("branch_specific"), sv_placement=ov.get("placement"),
        sv_reparam=ov.get("reparam"), sv_weight_decay_policy=ov.get("weight_decay_policy"),
        sv_final_norm_role=ov.get("final_norm_role"),
    )
    for k in LAYOUT_KEYS:
        out[k] = (layout or {}).get(k, 1)
    out.update(extra)
    return out


def pretrain_flags(args: Dict[str, Any]) -> str:
    """The pretrain_gpt_sv.py model flags that rebuild the model a checkpoint holds."""
    flags = [f"--num-layers {args['num_layers']}", f"--hidden-size {args['hidden_size']}",
             f"--ffn-hidden-size {args['ffn_hidden_size']}", f"--num-attention-heads {args['num_attention_heads']}",
             f"--seq-length {args['seq_length']}", f"--max-position-embeddings {args['max_position_embeddings']}",
             f"--normalization {args['normalization']}", f"--norm-epsilon {args['norm_epsilon']}",
             f"--position-embedding-type {args['position_embedding_type']}",
             f"--scale-vector-strategy {args['scale_vector_strategy']}"]
    if args["position_embedding_type"] == "rope":  # the flag is refused for other position embeddings
        flags.append(f"--rotary-base {args['rotary_base']}")
    if args.get("group_query_attention"):
        flags.append(f"--group-query-attention --num-query-groups {args['num_query_groups']}")
    for key in ("swiglu", "untie_embeddings_and_output_weights", "qk_layernorm", "sv_post_sublayer_norm"):
        if args.get(key):
            flags.append("--" + key.replace("_", "-"))
    if args.get("num_experts"):
        flags.append(f"--num-experts {args['num_experts']} --moe-router-topk {args['moe_router_topk']}")
        if args.get("moe_ffn_hidden_size"):
            flags.append(f"--moe-ffn-hidden-size {args['moe_ffn_hidden_size']}")
    for key in ("sv_placement", "sv_reparam", "sv_weight_decay_policy", "sv_final_norm_role"):
        if args.get(key) is not None:
            flags.append(f"--{key.replace('_', '-')} {args[key]}")
    if args.get("sv_branch_specific") is not None:
        flags.append("--sv-branch-specific" if args["sv_branch_specific"] else "--no-sv-branch-specific")
    for key in LAYOUT_KEYS:
        flags.append(f"--{key.replace('_', '-')} {args.get(key, 1)}")
    return " ".join(flags)
