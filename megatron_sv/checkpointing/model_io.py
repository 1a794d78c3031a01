"""Model-only checkpoint helpers for tools (conversion): the model's shape and scale-vector strategy as
recorded in a checkpoint's saved args, and the args a converted checkpoint must carry so that
``pretrain_gpt_sv.py --load DIR --finetune`` (or ``--no-load-optim``) accepts it.

The training entry point saves ``args`` (plain types, see training.arguments.args_for_checkpoint) in the
common state of every checkpoint; these helpers read and write the same keys without importing the
training package (imports point down: tools -> conversion -> checkpointing).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from megatron_sv.checkpointing.dist import load_common
from megatron_sv.checkpointing.layout import CheckpointError, checkpoint_dir, read_tracker
from megatron_sv.config_fields import command_line, fields_of, to_saved
from megatron_sv.models.gpt.shape import GPTShape
from megatron_sv.scale_vectors.config import ScaleVectorConfig, config_from_saved, preset_overrides

# One declaration of what a checkpoint's model is: the typed configs themselves. Every declared field of
# GPTShape (the model's shape) and of ScaleVectorConfig (the method) is saved under its key, rebuilt from
# saved args, and compared on resume and conversion, except the fields whose Flag says why they do not
# define the model (not_defining); a new field is therefore checked without touching any list
# (tests/checkpointing/test_model_args.py keeps this honest).
SHAPE_FIELDS_NOT_DEFINING = {d.name: d.flag.not_defining for d in fields_of(GPTShape) if d.flag.not_defining}
SV_FIELDS_NOT_DEFINING = {d.name: d.flag.not_defining for d in fields_of(ScaleVectorConfig) if d.flag.not_defining}
# saved with the shape, not a field of it: whether --num-query-groups counts
GQA_KEY = "group_query_attention"
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def shape_keys() -> Tuple[str, ...]:
    """The saved-args keys that rebuild the model's shape."""
    return tuple(d.key for d in fields_of(GPTShape)) + (GQA_KEY,)


def sv_keys() -> Tuple[str, ...]:
    """The saved-args keys that rebuild the scale-vector configuration (strategy plus --sv-* overrides)."""
    return tuple(dict.fromkeys(d.key for d in fields_of(ScaleVectorConfig)))


def model_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'--flag: checkpoint X, now Y' for every model- or method-defining value that differs, compared on
    the resolved typed configs (so a default spelled out equals the default left implicit)."""
    theirs, ours = shape_from_args(saved).resolved(), shape_from_args(current).resolved()
    out = []
    for d in fields_of(GPTShape):
        if d.flag.not_defining:
            continue
        a, b = getattr(theirs, d.name), getattr(ours, d.name)
        if a != b:
            flag = d.flag.help if d.flag.derived else d.option
            out.append(f"{flag}: checkpoint {a!r}, now {b!r}")
    sv_theirs, sv_ours = sv_config_from_args(saved), sv_config_from_args(current)
    for d in fields_of(ScaleVectorConfig):
        if d.flag.not_defining:
            continue
        a, b = getattr(sv_theirs, d.name), getattr(sv_ours, d.name)
        if a != b:
            if d.name == "learnable":
                a, b = saved.get("scale_vector_strategy"), current.get("scale_vector_strategy")
            out.append(f"--{d.key.replace('_', '-')}: checkpoint {a!r}, now {b!r} (scale-vector switch {d.name})")
    return out


def read_checkpoint_args(root: str) -> Tuple[int, Dict[str, Any]]:
    """(iteration, saved args) of the checkpoint the tracker in ``root`` names. Raises CheckpointError
    when there is none or it carries no model args."""
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
    return load_common(root, iteration)


def shape_from_args(args: Dict[str, Any]) -> GPTShape:
    """The GPTShape a checkpoint was made with (every field from its saved-args key; a key that an older
    checkpoint lacks takes the field's default)."""
    try:
        return GPTShape.from_saved(args)
    except KeyError as e:
        raise CheckpointError(f"the checkpoint's args have no {e.args[0]}") from None


def sv_config_from_args(args: Dict[str, Any]) -> ScaleVectorConfig:
    return config_from_saved(args)


def sv_overrides_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """The --sv-* overrides a checkpoint was trained with (switch name -> value)."""
    return preset_overrides(args)


def args_for_model(
    shape: GPTShape,
    strategy: str,
    sv_overrides: Optional[Dict[str, Any]] = None,
    layout: Optional[Dict[str, int]] = None,
    **extra,
) -> Dict[str, Any]:
    """Saved args (plain types) describing ``shape`` and the strategy, in the training CLI's names."""
    ov = sv_overrides or {}
    resolved = shape.resolved()
    gqa = resolved.num_query_groups != shape.num_attention_heads
    out: Dict[str, Any] = to_saved(resolved)
    out.update({GQA_KEY: gqa, "num_query_groups": resolved.num_query_groups if gqa else None})
    out["scale_vector_strategy"] = strategy
    for d in fields_of(ScaleVectorConfig):
        if not d.flag.derived:
            out[d.key] = ov.get(d.name)
    for k in LAYOUT_KEYS:
        out[k] = (layout or {}).get(k, 1)
    out.update(extra)
    return out


def pretrain_flags(args: Dict[str, Any]) -> str:
    """The pretrain_gpt_sv.py model flags that rebuild the model a checkpoint holds."""
    flags = command_line(GPTShape, args)
    if args.get(GQA_KEY):
        flags.insert(0, "--group-query-attention")
    else:
        flags = [f for f in flags if not f.startswith("--num-query-groups ")]
    flags.append(f"--scale-vector-strategy {args['scale_vector_strategy']}")
    flags += command_line(ScaleVectorConfig, args)
    flags += [f"--{key.replace('_', '-')} {args.get(key, 1)}" for key in LAYOUT_KEYS]
    return " ".join(flags)
