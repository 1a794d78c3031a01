"""Model-only checkpoint helpers for tools (conversion): the model's shape and scale-vector strategy as
recorded in a checkpoint's saved args, and the args a converted checkpoint must carry so that
``pretrain_gpt_sv.py --load DIR --finetune`` (or ``--no-load-optim``) accepts it.

The training entry point saves ``args`` (plain types, see training.arguments.args_for_checkpoint) in the
common state of every checkpoint; these helpers read and write the same keys without importing the
training package (imports point down: tools -> conversion -> checkpointing).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

from megatron_sv.checkpointing.layout import CheckpointError, checkpoint_dir, read_tracker

# One declaration of what a checkpoint's model is: the typed configs themselves. Every field of GPTShape (the
# model's shape) and of ScaleVectorConfig (the method) is saved under its CLI name, rebuilt from saved args,
# and compared on resume and conversion, except the fields exempted here with the reason; a new field is
# therefore checked without touching any list (tests/checkpointing/test_model_args.py keeps this honest).
SHAPE_FIELD_ARG = {"vocab_size": "padded_vocab_size", "post_sublayer_norm": "sv_post_sublayer_norm"}
SHAPE_FIELDS_NOT_DEFINING = {
    "seq_length": "the sample length is a data choice (RoPE and learned positions follow --max-position-embeddings)",
    "init_method_std": "only the initialization, which a loaded checkpoint replaces",
    "moe_token_dispatcher_type": "how tokens travel between experts, not what they compute",
    "moe_aux_loss_coeff": "a term of the training loss, not of the model",
}
SV_FIELDS_NOT_DEFINING = {"fold_once_per_step": "where the fold runs; the same function and gradients"}


def _sv_field_arg(field: str) -> str:
    return "scale_vector_strategy" if field == "learnable" else f"sv_{field}"


def _shape_fields():
    from megatron_sv.models.gpt.model import GPTShape

    return dataclasses.fields(GPTShape)


def _sv_fields():
    from megatron_sv.scale_vectors.config import ScaleVectorConfig

    return dataclasses.fields(ScaleVectorConfig)


def shape_keys() -> Tuple[str, ...]:
    """The saved-args keys that rebuild the model's shape."""
    return tuple(SHAPE_FIELD_ARG.get(f.name, f.name) for f in _shape_fields()) + ("group_query_attention",)


def sv_keys() -> Tuple[str, ...]:
    """The saved-args keys that rebuild the scale-vector configuration (strategy plus --sv-* overrides)."""
    return tuple(dict.fromkeys(_sv_field_arg(f.name) for f in _sv_fields()))


LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def _flag(arg: str) -> str:
    return "--" + arg.replace("_", "-")


def model_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'--flag: checkpoint X, now Y' for every model- or method-defining value that differs, compared on
    the resolved typed configs (so a default spelled out equals the default left implicit)."""
    theirs, ours = shape_from_args(saved), shape_from_args(current)
    out = []
    for f in _shape_fields():
        if f.name in SHAPE_FIELDS_NOT_DEFINING:
            continue
        a, b = _resolved(theirs, f.name), _resolved(ours, f.name)
        if a != b:
            arg = SHAPE_FIELD_ARG.get(f.name, f.name)
            flag = (
                "padded vocabulary (tokenizer, --make-vocab-size-divisible-by, TP)"
                if arg == "padded_vocab_size"
                else _flag(arg)
            )
            out.append(f"{flag}: checkpoint {a!r}, now {b!r}")
    sv_theirs, sv_ours = sv_config_from_args(saved), sv_config_from_args(current)
    for f in _sv_fields():
        if f.name in SV_FIELDS_NOT_DEFINING:
            continue
        a, b = getattr(sv_theirs, f.name), getattr(sv_ours, f.name)
        if a != b:
            flag = _flag(_sv_field_arg(f.name))
            if f.name == "learnable":
                a, b = saved.get("scale_vector_strategy"), current.get("scale_vector_strategy")
            out.append(f"{flag}: checkpoint {a!r}, now {b!r} (scale-vector switch {f.name})")
    return out


def _resolved(shape, name: str):
    if name == "ffn_hidden_size":
        return shape.resolved_ffn_hidden_size()
    if name == "max_position_embeddings":
        return shape.max_position_embeddings or shape.seq_length
    if name == "num_query_groups":
        return shape.num_query_groups or shape.num_attention_heads
    return getattr(shape, name)


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
    """The GPTShape a checkpoint was made with (every field from its saved-args key; a key that an older
    checkpoint lacks takes the field's default)."""
    from megatron_sv.models.gpt.model import GPTShape

    a = dict(args)
    if a.get("padded_vocab_size") is None:
        raise CheckpointError("the checkpoint's args have no padded_vocab_size")
    values = {}
    for f in _shape_fields():
        key = SHAPE_FIELD_ARG.get(f.name, f.name)
        if key in a and a[key] is not None:
            values[f.name] = a[key]
        elif f.default is dataclasses.MISSING:
            raise CheckpointError(f"the checkpoint's args have no {key}")
    if not a.get("group_query_attention"):
        values.pop("num_query_groups", None)
    return GPTShape(**values)


def sv_config_from_args(args: Dict[str, Any]):
    from megatron_sv.scale_vectors.config import strategy_config

    overrides = {f.name: args.get(_sv_field_arg(f.name)) for f in _sv_fields() if f.name != "learnable"}
    return strategy_config(args.get("scale_vector_strategy", "standard"), **overrides)


def args_for_model(
    shape,
    strategy: str,
    sv_overrides: Optional[Dict[str, Any]] = None,
    layout: Optional[Dict[str, int]] = None,
    **extra,
) -> Dict[str, Any]:
    """Saved args (plain types) describing ``shape`` and the strategy, in the training CLI's names."""
    ov = sv_overrides or {}
    gqa = shape.num_query_groups is not None and shape.num_query_groups != shape.num_attention_heads
    out: Dict[str, Any] = {SHAPE_FIELD_ARG.get(f.name, f.name): getattr(shape, f.name) for f in _shape_fields()}
    out.update(
        ffn_hidden_size=shape.resolved_ffn_hidden_size(),
        group_query_attention=gqa,
        num_query_groups=shape.num_query_groups if gqa else None,
        max_position_embeddings=shape.max_position_embeddings or shape.seq_length,
        scale_vector_strategy=strategy,
    )
    for f in _sv_fields():
        if f.name != "learnable":
            out[_sv_field_arg(f.name)] = ov.get(f.name)
    for k in LAYOUT_KEYS:
        out[k] = (layout or {}).get(k, 1)
    out.update(extra)
    return out


def pretrain_flags(args: Dict[str, Any]) -> str:
    """The pretrain_gpt_sv.py model flags that rebuild the model a checkpoint holds."""
    flags = [
        f"--num-layers {args['num_layers']}",
        f"--hidden-size {args['hidden_size']}",
        f"--ffn-hidden-size {args['ffn_hidden_size']}",
        f"--num-attention-heads {args['num_attention_heads']}",
        f"--seq-length {args['seq_length']}",
        f"--max-position-embeddings {args['max_position_embeddings']}",
        f"--normalization {args['normalization']}",
        f"--norm-epsilon {args['norm_epsilon']}",
        f"--position-embedding-type {args['position_embedding_type']}",
        f"--scale-vector-strategy {args['scale_vector_strategy']}",
    ]
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
