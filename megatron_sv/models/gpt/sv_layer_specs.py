"""Megatron-Core layer/block specs that wire the scale-vector method into a GPT: one spec body for every backend.

The method lives in ``megatron_sv.scale_vectors``; this module only decides which module fills which
slot of Megatron's TransformerLayer, for a given ``ScaleVectorConfig``, with the module classes of the
backend (backends.py: local, FP8 on the local backend, Transformer Engine):

  input_layernorm / pre_mlp_layernorm   ScaledNorm, with the shared gamma unless vectors are per branch
                                        (TE: fused into the next GEMM where the gamma is one plain vector)
  linear_qkv / linear_fc1 (+ experts)   the backend's column linear with vectors (HG gamma_b, DP/DNP u_b, DNP N_b)
  linear_proj / linear_fc2 (+ experts)  the backend's row linear (optionally followed by a post-sub-layer norm)
  mlp                                   InnerNormSwiGLUMLP under DNP (gate/up norm fused with SwiGLU)
  q/k_layernorm                         optional QK-norm (an Output-Norm)
  linear_proj / linear_fc2              optional post-sub-layer norm (Gemma / Peri-LN Output-Norm)
  router                                ScaledTopKRouter (its own gamma/u)
  final norm                            ScaledNorm (Input-Norm of the LM head by default)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_sv.fp8.recipe import FP8Recipe
from megatron_sv.models.gpt.backends import Backend, backend_for
from megatron_sv.models.gpt.seeding import SeededTransformerLayer
from megatron_sv.scale_vectors.config import ScaleVectorConfig
from megatron_sv.scale_vectors.linears import apply_post_norm, make_post_norm
from megatron_sv.scale_vectors.mlp import InnerNormSwiGLUMLP
from megatron_sv.scale_vectors.norms import ScaledNorm
from megatron_sv.scale_vectors.router import ScaledTopKRouter
from megatron_sv.scale_vectors.te_linears import fuses_norm_into_linear


@dataclass(frozen=True)
class LayerOptions:
    """Architecture options that change which modules the spec places (the usual Megatron flags)."""

    num_layers: int
    gated_mlp: bool = True  # SwiGLU: linear_fc1 = [gate | up]
    num_experts: Optional[int] = None
    qk_layernorm: bool = False
    post_sublayer_norm: bool = False  # Output-Norms after attention and MLP (Gemma / Peri-LN)
    core_attention: Optional[type] = None  # SDPA on CPU; a faster kernel may be supplied on GPU
    init_seed: Optional[int] = None  # layout-independent init (see seeding.py); None: Megatron's order
    transformer_impl: str = "local"  # --transformer-impl: "local" or "transformer_engine" (backends.py)
    fp8: Optional[FP8Recipe] = None  # local backend: FP8 GEMMs in every column/row-parallel linear


def _linear(backend: Backend, module: type, **params):
    """The spec of a linear slot: ``module`` with its params and the backend's linear params (FP8 recipe)."""
    params = dict(params, **backend.linear_params)
    return ModuleSpec(module=module, params=params) if params else module


def _check(sv: ScaleVectorConfig, opts: LayerOptions, backend: Backend) -> None:
    if sv.has_inner_norms and opts.qk_layernorm:
        raise ValueError(
            "placement dual_norm (DNP) already normalizes q and k per head (its inner norm is a QK-norm "
            "with the scale on the output side); drop --qk-layernorm or choose another placement"
        )
    if opts.num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    if opts.num_experts and not backend.supports_moe:
        raise NotImplementedError(
            f"MoE layers are not available on --transformer-impl {opts.transformer_impl} yet; "
            "use --transformer-impl local"
        )
    if opts.core_attention is not None and not backend.takes_core_attention:
        raise ValueError(
            f"the {backend.name} backend uses its own core attention; core_attention is for the local spec"
        )


def _norm(sv: ScaleVectorConfig, *, has_scale: bool, role: str, input_split: str) -> ModuleSpec:
    return ModuleSpec(module=ScaledNorm, params=dict(sv=sv, has_scale=has_scale, role=role, input_split=input_split))


def _pre_norm(sv: ScaleVectorConfig) -> ModuleSpec:
    # With branch-specific vectors each branch reads N(h) through its own gamma_b (folded in the
    # linear), so the pre-norm itself carries no scale; otherwise it holds the shared gamma.
    return _norm(sv, has_scale=not sv.branch_specific, role="input", input_split="sequence")


def _mlp_submodules(sv: ScaleVectorConfig, opts: LayerOptions, backend: Backend, expert: bool) -> MLPSubmodules:
    if _fuses_pre_norm(sv, backend) and not expert:
        fc1 = backend.fused_norm_column_linear
    else:
        layout = "gated_fc1" if opts.gated_mlp else "fc1"
        fc1 = _linear(backend, backend.scaled_column_linear, sv=sv, branch_layout=layout)
    if opts.post_sublayer_norm and not expert:
        fc2 = _linear(backend, backend.post_norm_row_linear, sv=sv)
    else:
        fc2 = _linear(backend, backend.row_linear)
    return MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)


def _fuses_pre_norm(sv: ScaleVectorConfig, backend: Backend) -> bool:
    """Whether the pre-norms live inside the backend's fused norm + GEMM (their slots are then identities)."""
    return backend.fused_norm_column_linear is not None and fuses_norm_into_linear(sv)


class PostNormMoELayer(MoELayer):
    """MoELayer followed by a post-sub-layer Output-Norm on its combined output."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, *, sv):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.post_norm = make_post_norm(config, config.hidden_size, sv, tp_group=None)

    def forward(self, hidden_states, *args, **kwargs):
        return apply_post_norm(self.post_norm, *super().forward(hidden_states, *args, **kwargs))


def _mlp_spec(sv: ScaleVectorConfig, opts: LayerOptions, backend: Backend) -> ModuleSpec:
    if not opts.num_experts:
        # Under DNP the gate/up inner norm and SwiGLU run as one fused op (Megatron's experts build plain MLPs).
        mlp = InnerNormSwiGLUMLP if sv.has_inner_norms else MLP
        return ModuleSpec(module=mlp, submodules=_mlp_submodules(sv, opts, backend, expert=False))
    experts = ModuleSpec(module=SequentialMLP, submodules=_mlp_submodules(sv, opts, backend, expert=True))
    submodules = MoESubmodules(experts=experts, shared_experts=None, router=partial(ScaledTopKRouter, sv=sv))
    if opts.post_sublayer_norm:
        return ModuleSpec(module=PostNormMoELayer, params=dict(sv=sv), submodules=submodules)
    return ModuleSpec(module=MoELayer, submodules=submodules)


def get_sv_layer_spec(sv: ScaleVectorConfig, opts: LayerOptions) -> ModuleSpec:
    """The TransformerLayer spec for strategy ``sv`` on the backend of ``opts``."""
    backend = backend_for(opts.transformer_impl, opts.fp8)
    _check(sv, opts, backend)
    qk_norm = _norm(sv, has_scale=True, role="output", input_split="heads") if opts.qk_layernorm else IdentityOp
    if opts.post_sublayer_norm:
        linear_proj = _linear(backend, backend.post_norm_row_linear, sv=sv)
    else:
        linear_proj = _linear(backend, backend.row_linear)
    if _fuses_pre_norm(sv, backend):
        linear_qkv, pre_norm = backend.fused_norm_column_linear, IdentityOp
    else:
        linear_qkv = _linear(backend, backend.scaled_column_linear, sv=sv, branch_layout="qkv")
        pre_norm = _pre_norm(sv)
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=opts.core_attention or backend.core_attention,
            linear_proj=linear_proj,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer if opts.init_seed is None else SeededTransformerLayer,
        params={} if opts.init_seed is None else {"init_seed": opts.init_seed},
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm,
            mlp=_mlp_spec(sv, opts, backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_sv_block_spec(
    sv: ScaleVectorConfig, opts: LayerOptions, config, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage: its layers plus our final norm (TransformerBlock would
    otherwise take the final norm from a module global)."""
    layer = get_sv_layer_spec(sv, opts)
    final_norm = _norm(sv, has_scale=True, role=sv.final_norm_role, input_split="sequence")
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local, layer_norm=final_norm)
