"""Configuration of a megatron_sv model exported with inner norms (DNP / unified), QK-norm or
post-sub-layer norms: a Llama configuration plus the switches for those norms.

Written by megatron_sv's tools/convert_checkpoint.py next to the weights (trust_remote_code).
"""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


@strict
class MegatronSVConfig(LlamaConfig):
    model_type = "megatron_sv"

    # DNP inner norms: q and k normalized per head over head_dim, gate and up over the whole ffn width,
    # each followed by its output-side scale vector u (``out_scale`` parameters).
    sv_inner_norm: bool = False
    # QK-norm (Megatron's --qk-layernorm): RMSNorm over head_dim with a scale of head_dim entries.
    qk_norm: bool = False
    # Output-Norms after the attention and MLP sub-layers (Gemma / Peri-LN).
    post_sublayer_norm: bool = False
    # MoE (Mixtral-style top-k softmax routing); None for a dense MLP.
    num_local_experts: int | None = None
    num_experts_per_tok: int = 2
    # the megatron_sv strategy the model was trained with (informational)
    sv_strategy: str | None = None


__all__ = ["MegatronSVConfig"]
