"""Build a Megatron-Core GPTModel whose norms carry scale vectors per a ``ScaleVectorConfig``.

``GPTShape`` (models/gpt/shape.py) holds the architecture, declared once with its flags; ``ParallelLayout``
the parallel sizes; ``transformer_config`` turns both into Megatron's TransformerConfig and
``build_gpt_model`` assembles the model for this pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sv.fp8.recipe import FP8Recipe
from megatron_sv.scale_vectors.config import ScaleVectorConfig
from megatron_sv.scale_vectors.norms import check_norm_kind

from .shape import GPTShape, default_ffn_hidden_size, layout_problems, shape_problems
from .sv_layer_specs import LayerOptions, get_sv_block_spec

__all__ = ["GPTShape", "ParallelLayout", "build_gpt_model", "default_ffn_hidden_size", "transformer_config"]


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    bf16: bool = False


def transformer_config(shape: GPTShape, layout: ParallelLayout = ParallelLayout(), **extra) -> TransformerConfig:
    check_norm_kind(shape.normalization)
    if shape.position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise ValueError(f"unsupported --position-embedding-type {shape.position_embedding_type!r}")
    problems = shape_problems(shape.hidden_size, shape.num_attention_heads, shape.num_query_groups)
    problems += layout_problems(
        shape,
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.expert_model_parallel_size,
        layout.sequence_parallel,
    )
    if problems:
        raise ValueError("; ".join(problems))
    moe = {}
    if shape.num_experts:
        moe = dict(
            num_moe_experts=shape.num_experts,
            moe_router_topk=shape.moe_router_topk,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size or shape.resolved_ffn_hidden_size(),
            moe_token_dispatcher_type=shape.moe_token_dispatcher_type,
            moe_aux_loss_coeff=shape.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if shape.moe_aux_loss_coeff > 0 else "none",
            moe_grouped_gemm=False,
        )
    dtype = torch.bfloat16 if layout.bf16 else torch.float32
    cfg = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.resolved_ffn_hidden_size(),
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.query_groups,
        kv_channels=shape.hidden_size // shape.num_attention_heads,
        normalization=shape.normalization,
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=shape.swiglu,
        activation_func=F.silu if shape.swiglu else F.gelu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_method_std,
        # Our QK-norm is placed by the spec and reduces its own gradient; keeping Megatron's flag off
        # stops finalize_model_grads from reducing it a second time by name.
        qk_layernorm=False,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        bf16=layout.bf16,
        pipeline_dtype=dtype,
        # Full weights are initialized on CPU from one generator and then split, so a model has the same
        # weights at any TP/PP/EP layout (exact cross-layout equivalence is what the parallel tests check).
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        **moe,
    )
    cfg.update(extra)
    return TransformerConfig(**cfg)


def layer_options(
    shape: GPTShape,
    core_attention=None,
    init_seed: Optional[int] = None,
    transformer_impl: str = "local",
    fp8: Optional[FP8Recipe] = None,
) -> LayerOptions:
    return LayerOptions(
        num_layers=shape.num_layers,
        gated_mlp=shape.swiglu,
        num_experts=shape.num_experts,
        qk_layernorm=shape.qk_layernorm,
        post_sublayer_norm=shape.post_sublayer_norm,
        core_attention=core_attention,
        init_seed=init_seed,
        transformer_impl=transformer_impl,
        fp8=fp8,
    )


def build_gpt_model(
    shape: GPTShape,
    sv: ScaleVectorConfig,
    config: TransformerConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    core_attention=None,
    init_seed: Optional[int] = None,
    vp_stage: Optional[int] = None,
    transformer_impl: str = "local",
    fp8: Optional[FP8Recipe] = None,
) -> GPTModel:
    """The GPT for this pipeline stage (first/last stage decided from parallel_state when None).

    ``init_seed``: draw every layer's (and expert's) weights from this seed and its global position,
    so the full model is the same at any TP/PP/EP layout (models/gpt/seeding.py). Defaults to the CPU
    generator's current initial seed (``torch.manual_seed`` before building).
    ``transformer_impl``: "local" (runs anywhere) or "transformer_engine" (TE GEMMs, FP8 via
    ``config.fp8``; needs CUDA and TE, see models/gpt/backends.py).
    ``fp8``: on the local backend, run every column/row-parallel linear's GEMMs in FP8 with this recipe
    (torch._scaled_mm; the LM head stays in the model's precision; see docs/fp8.md).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if init_seed is None:
        init_seed = torch.initial_seed()
    opts = layer_options(shape, core_attention, init_seed, transformer_impl, fp8)
    spec = get_sv_block_spec(sv, opts, config, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings or shape.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
        rotary_base=shape.rotary_base,
    )
    return model
