"""Layer/block specs of the scale-vector GPT on Transformer Engine (``--transformer-impl transformer_engine``).

Same slots and the same checkpoint key schema as the local specs (``sv_layer_specs.py``); what differs:

  strategy          input_layernorm       linear_qkv / linear_fc1                  core attention
  standard          IdentityOp (fused)    TE fused norm + GEMM (FP8 input from norm) TE DotProductAttention
  everything else   ScaledNorm (ours)     TE GEMM on the folded weight W_eff        TE DotProductAttention

linear_proj / linear_fc2 are TE row-parallel GEMMs (with our post-sub-layer norm when asked); QK-norm,
DNP's inner norms and the final norm are our norms. TE is imported only when a TE spec is built; without
TE (or CUDA) this raises ``TransformerEngineUnavailable``. MoE layers are not offered on TE yet.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_sv.models.gpt.seeding import SeededTransformerLayer
from megatron_sv.scale_vectors.config import ScaleVectorConfig
from megatron_sv.scale_vectors.te_linears import fuses_norm_into_linear, require_transformer_engine, te_classes

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def check_transformer_impl(impl: str) -> str:
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {list(TRANSFORMER_IMPLS)}, got {impl!r}")
    return impl


def get_te_layer_spec(sv: ScaleVectorConfig, opts) -> ModuleSpec:
    """The TransformerLayer spec for strategy ``sv`` on Transformer Engine."""
    from .sv_layer_specs import _check, _norm, _pre_norm

    _check(sv, opts)
    if opts.num_experts:
        raise NotImplementedError(
            "MoE layers are not available on --transformer-impl transformer_engine yet; use --transformer-impl local"
        )
    if opts.core_attention is not None:
        raise ValueError(
            "the Transformer Engine spec uses TE's DotProductAttention; core_attention is for the local spec"
        )
    require_transformer_engine()
    te = te_classes()
    fused = fuses_norm_into_linear(sv)
    qk_norm = _norm(sv, has_scale=True, role="output", input_split="heads") if opts.qk_layernorm else IdentityOp
    row = (
        ModuleSpec(module=te.SVTEPostNormRowParallelLinear, params=dict(sv=sv))
        if opts.post_sublayer_norm
        else te.SVTERowParallelLinear
    )
    if fused:
        qkv, fc1, pre_norm = te.SVTELayerNormColumnParallelLinear, te.SVTELayerNormColumnParallelLinear, IdentityOp
    else:
        qkv = partial(te.SVTEColumnParallelLinear, sv=sv, branch_layout="qkv")
        fc1 = partial(te.SVTEColumnParallelLinear, sv=sv, branch_layout="gated_fc1" if opts.gated_mlp else "fc1")
        pre_norm = _pre_norm(sv)
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=qkv,
            core_attention=te.SVTEDotProductAttention,
            linear_proj=row,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=row))
    return ModuleSpec(
        module=TransformerLayer if opts.init_seed is None else SeededTransformerLayer,
        params={} if opts.init_seed is None else {"init_seed": opts.init_seed},
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_te_block_spec(
    sv: ScaleVectorConfig, opts, config, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    from .sv_layer_specs import _norm

    layer = get_te_layer_spec(sv, opts)
    final_norm = _norm(sv, has_scale=True, role=sv.final_norm_role, input_split="sequence")
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local, layer_norm=final_norm)
