"""Build the Megatron baseline GPTModel (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings) on the
reference spec. Weights are created on the CPU from the global seed (use_cpu_initialization), so
the same seed gives the same full weights at any TP/PP/EP layout."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sv.models.gpt.reference_spec import get_reference_block_spec


def reference_config(
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_query_groups: int = 2,
    ffn_hidden_size: Optional[int] = None,
    normalization: str = "RMSNorm",
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    expert_model_parallel_size: int = 1,
    num_moe_experts: Optional[int] = None,
    moe_router_topk: int = 2,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """A TransformerConfig for the baseline: no biases, SwiGLU, dropout 0, no fused kernels,
    CPU initialization. ``overrides`` go straight to TransformerConfig."""
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size or 2 * hidden_size,
        normalization=normalization,
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        expert_model_parallel_size=expert_model_parallel_size,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    if num_moe_experts is not None:
        kwargs.update(
            num_moe_experts=num_moe_experts,
            moe_router_topk=moe_router_topk,
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=0.0,
            moe_ffn_hidden_size=ffn_hidden_size or 2 * hidden_size,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_reference_gpt(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    rotary_base: int = 10000,
    layout_independent_init: bool = True,
) -> GPTModel:
    """The baseline GPTModel for this pipeline stage (stage flags default to parallel_state's).

    With ``layout_independent_init`` each transformer layer is seeded from the current CPU
    generator's initial seed and its global layer number, so one seed gives the same full
    weights at any TP/PP/EP layout (embedding and output layer need no reseeding: they are drawn
    first on the first stage and right after the same last layer on the last stage)."""
    init_seed = torch.initial_seed() if layout_independent_init else None
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_reference_block_spec(config, vp_stage=vp_stage, init_seed=init_seed),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
