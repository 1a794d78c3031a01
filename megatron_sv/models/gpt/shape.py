"""The model's architecture (``GPTShape``), declared once: every field carries its command-line flag, help,
parser default and checks (config_fields.Flag), and the padded vocabulary and the divisibility rules of a
parallel layout live here too. The parser, the validation, a checkpoint's saved arguments, the resume
check, the conversion tools and the model builder all read this declaration.

Imports neither torch nor megatron.core (the command line checks a shape in a fraction of a second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, List, Mapping, Optional

from megatron_sv.config_fields import declared, from_saved


def default_ffn_hidden_size(hidden_size: int, swiglu: bool, ffn_hidden_size: Optional[int] = None) -> int:
    """--ffn-hidden-size, or its default: 4h, or 8h/3 rounded up to a multiple of 64 for SwiGLU."""
    if ffn_hidden_size is not None:
        return ffn_hidden_size
    if swiglu:
        return int(((8 * hidden_size / 3) + 63) // 64 * 64)
    return 4 * hidden_size


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """The embedding's rows: the tokenizer's vocabulary rounded up to a multiple of divisible_by x TP (so every
    TP rank holds an equal slice), as Megatron-LM pads it."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _rope(a) -> bool:
    return a.position_embedding_type == "rope"


def _moe(a) -> bool:
    return bool(a.num_experts)


# Megatron-LM's command-line defaults are a plain GeLU MLP and tied embeddings; the library default (tests,
# conversion from Llama) is the modern one. The parser keeps Megatron-LM's.
_MEGATRON_LM_DEFAULT = False


@dataclass(frozen=True)
class GPTShape:
    num_layers: int = declared(help="transformer layers (required)", required=True, positive=True)
    hidden_size: int = declared(help="model width d (required)", required=True, positive=True)
    num_attention_heads: int = declared(help="attention heads (required)", required=True, positive=True)
    vocab_size: int = declared(
        key="padded_vocab_size",
        derived=True,
        help="padded vocabulary (tokenizer, --make-vocab-size-divisible-by, TP)",
    )
    seq_length: int = declared(
        help="tokens per sample (required)",
        required=True,
        positive=True,
        not_defining="the sample length is a data choice (RoPE and learned positions follow --max-position-embeddings)",
    )
    ffn_hidden_size: Optional[int] = declared(
        None,
        help="MLP width (default: 4 x --hidden-size; with --swiglu 8/3 x --hidden-size rounded up to a multiple of 64)",
    )
    num_query_groups: Optional[int] = declared(
        None, help="key/value head groups under --group-query-attention (default: one per head)"
    )
    max_position_embeddings: Optional[int] = declared(
        None, help="positions of learned embeddings (default: --seq-length)"
    )
    normalization: str = declared(
        "RMSNorm", choices=("RMSNorm", "LayerNorm"), help="the deterministic normalization N(h)"
    )
    norm_epsilon: float = declared(1e-5, finite=True, help="epsilon of every normalization")
    swiglu: bool = declared(
        True, switch=True, cli_default=_MEGATRON_LM_DEFAULT, help="gated SwiGLU MLP (gate and up branches)"
    )
    position_embedding_type: str = declared(
        "rope", choices=("rope", "learned_absolute", "none"), help="position encoding"
    )
    rotary_base: int = declared(
        10000, applies=_rope, needs="--position-embedding-type rope", help="RoPE base (default: 10000)"
    )
    untie_embeddings_and_output_weights: bool = declared(
        True,
        switch=True,
        cli_default=_MEGATRON_LM_DEFAULT,
        help="separate LM-head weight instead of the tied input embedding",
    )
    qk_layernorm: bool = declared(False, switch=True, help="normalize queries and keys per head (QK-norm)")
    post_sublayer_norm: bool = declared(
        False,
        key="sv_post_sublayer_norm",
        group="scale vectors",
        switch=True,
        help="add Output-Norms after the attention and MLP sub-layers (Gemma / Peri-LN)",
    )
    init_method_std: float = declared(
        0.02,
        finite=True,
        help="std of the normal weight init",
        not_defining="only the initialization, which a loaded checkpoint replaces",
    )
    num_experts: Optional[int] = declared(None, positive=True, help="MoE experts per layer (default: dense MLP)")
    moe_router_topk: int = declared(2, applies=_moe, needs="--num-experts", help="experts per token (default: 2)")
    moe_ffn_hidden_size: Optional[int] = declared(
        None, applies=_moe, needs="--num-experts", help="each expert's MLP width (default: --ffn-hidden-size)"
    )
    moe_token_dispatcher_type: str = declared(
        "allgather",
        choices=("allgather", "alltoall"),
        applies=_moe,
        needs="--num-experts",
        help="MoE token dispatcher (alltoall needs NCCL; default: allgather)",
        not_defining="how tokens travel between experts, not what they compute",
    )
    moe_aux_loss_coeff: float = declared(
        0.0,
        finite=True,
        applies=_moe,
        needs="--num-experts",
        help="load-balancing loss coefficient (default: 0.0)",
        not_defining="a term of the training loss, not of the model",
    )

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], **given: Any) -> "GPTShape":
        """The shape that saved arguments (a checkpoint's, or the resolved flags) describe; a key that an older
        checkpoint lacks takes the field's default. ``num_query_groups`` counts only under
        ``group_query_attention``. Raises KeyError naming a missing required key."""
        values = from_saved(cls, saved, **given)
        if not saved.get("group_query_attention"):
            values.pop("num_query_groups", None)
        return cls(**values)

    def resolved_ffn_hidden_size(self) -> int:
        return default_ffn_hidden_size(self.hidden_size, self.swiglu, self.ffn_hidden_size)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def resolved(self) -> "GPTShape":
        """The same model with every implicit default spelled out (two shapes that build the same model are
        equal once resolved)."""
        return replace(
            self,
            ffn_hidden_size=self.resolved_ffn_hidden_size(),
            num_query_groups=self.query_groups,
            max_position_embeddings=self.max_position_embeddings or self.seq_length,
        )


def shape_problems(hidden_size: int, num_attention_heads: int, num_query_groups: Optional[int] = None) -> List[str]:
    """What makes a shape impossible on its own (heads that do not split the width or the query groups)."""
    out = []
    if hidden_size % num_attention_heads:
        out.append(f"--hidden-size {hidden_size} is not divisible by --num-attention-heads {num_attention_heads}")
    if num_query_groups is not None and num_attention_heads % num_query_groups:
        out.append(
            f"--num-attention-heads {num_attention_heads} is not divisible by --num-query-groups {num_query_groups}"
        )
    return out


def layout_problems(
    shape: GPTShape,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    check_vocab: bool = False,
) -> List[str]:
    """Everything that keeps ``shape`` from splitting over TP x PP x EP (and sequence parallelism); the one
    home of these rules, used by the command line, the model builder and the conversion tools.
    ``check_vocab``: the padded vocabulary is known (it is padded to a multiple of TP by construction)."""
    out = []
    if min(tp, pp, ep) < 1:
        out.append(f"parallel sizes must be >= 1, got TP {tp} / PP {pp} / EP {ep}")
        return out
    if sequence_parallel and tp == 1:
        out.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    tp_flag = f"--tensor-model-parallel-size {tp}"
    if shape.num_attention_heads % tp:
        out.append(f"--num-attention-heads {shape.num_attention_heads} is not divisible by {tp_flag}")
    if shape.query_groups % tp:
        out.append(f"the number of query groups ({shape.query_groups}) is not divisible by {tp_flag}")
    # the MLP that is split: the experts' where they have their own width, else the dense (or shared) one
    expert_width = shape.num_experts and shape.moe_ffn_hidden_size
    ffn, flag = (
        (shape.moe_ffn_hidden_size, "--moe-ffn-hidden-size")
        if expert_width
        else (
            shape.resolved_ffn_hidden_size(),
            "--ffn-hidden-size",
        )
    )
    if ffn % tp:
        out.append(f"the MLP width {ffn} ({flag}) is not divisible by --tensor-model-parallel-size {tp}")
    if shape.num_layers % pp:
        out.append(f"--num-layers {shape.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if sequence_parallel and tp > 1 and shape.seq_length % tp:
        out.append(
            f"--seq-length {shape.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
            "(needed by --sequence-parallel)"
        )
    if shape.num_experts:
        if shape.num_experts % ep:
            out.append(f"--num-experts {shape.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    elif ep > 1:
        out.append("--expert-model-parallel-size > 1 needs --num-experts")
    if check_vocab and shape.vocab_size % tp:
        out.append(f"the padded vocabulary {shape.vocab_size} is not divisible by --tensor-model-parallel-size {tp}")
    return out
