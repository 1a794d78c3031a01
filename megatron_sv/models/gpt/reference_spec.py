"""The Megatron baseline layer/block specs: Megatron-Core's local modules (ColumnParallelLinear,
RowParallelLinear, SelfAttention, MLP, MoELayer) with SDPA core attention and SP-capable norms,
including the final norm. Used by the parity tests and as the benchmark baseline."""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_sv.models.gpt.norm import SPNorm
from megatron_sv.models.gpt.seeding import SeededTransformerLayer
from megatron_sv.platform.attention import SDPACoreAttention


def get_reference_mlp_spec(num_experts: Optional[int] = None) -> ModuleSpec:
    """Dense MLP, or an MoE layer with local experts (SequentialMLP: the one local expert module that every
    supported megatron-core has; GroupedMLP was removed in 0.19). The token dispatcher comes from
    config.moe_token_dispatcher_type."""
    if num_experts is None:
        return ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )
    experts = ModuleSpec(
        module=SequentialMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(experts=experts, shared_experts=None),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def get_reference_layer_spec(
    num_experts: Optional[int] = None,
    qk_layernorm: bool = False,
    init_seed: Optional[int] = None,
) -> ModuleSpec:
    """One transformer layer: pre-norm self-attention and MLP/MoE with residuals. With
    ``init_seed`` the layer is a SeededTransformerLayer (layout-independent initialization)."""
    return ModuleSpec(
        module=TransformerLayer if init_seed is None else SeededTransformerLayer,
        params={} if init_seed is None else {"init_seed": init_seed},
        submodules=TransformerLayerSubmodules(
            input_layernorm=SPNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=SPNorm if qk_layernorm else IdentityOp,
                    k_layernorm=SPNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SPNorm,
            mlp=get_reference_mlp_spec(num_experts),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_reference_block_spec(
    config: TransformerConfig,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    qk_layernorm: bool = False,
    init_seed: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its layers plus our final norm (TransformerBlock
    would otherwise take the final norm from a module global). MoE when config.num_moe_experts
    is set. ``init_seed``: see
    SeededTransformerLayer."""
    layer = get_reference_layer_spec(
        num_experts=config.num_moe_experts,
        qk_layernorm=qk_layernorm,
        init_seed=init_seed,
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SPNorm)
