"""Core attention on torch's scaled_dot_product_attention: a drop-in for Megatron-Core's
local ``DotProductAttention`` (which needs CUDA) in layer specs, on CPU and GPU alike."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """softmax(Q K^T * scale + mask) V per attention head, causal or with a boolean mask.

    Inputs follow Megatron's core-attention contract: query [sq, b, np, hn], key/value
    [sk, b, ng, hn] with np/ng the heads/query groups of this tensor-parallel rank; output
    [sq, b, np * hn].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            tp_size = pg_collection.tp.size()
        else:
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        query_groups = config.num_query_groups or config.num_attention_heads
        if config.num_attention_heads % tp_size or query_groups % tp_size:
            raise ValueError(
                f"heads ({config.num_attention_heads}) and query groups ({query_groups}) must be "
                f"divisible by the tensor-parallel size ({tp_size})"
            )
        self.num_heads_per_partition = config.num_attention_heads // tp_size
        self.num_groups_per_partition = query_groups // tp_size
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.hidden_size_per_partition = head_dim * self.num_heads_per_partition
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention does not support packed sequences")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, np_, hn = query.shape
        ng = key.shape[2]
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if ng != np_:  # grouped-query attention: each kv head serves np/ng query heads
            k = k.repeat_interleave(np_ // ng, dim=1)
            v = v.repeat_interleave(np_ // ng, dim=1)

        is_causal = mask_type == AttnMaskType.causal
        attn_mask = None
        if not is_causal and attention_mask is not None:
            attn_mask = ~attention_mask  # Megatron masks mark positions to drop; SDPA the kept ones
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            if is_causal:
                causal = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril()
                bias = bias.masked_fill(~causal, float("-inf"))
            attn_mask, is_causal = bias, False

        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # dropout differs across TP ranks (different heads): use the model-parallel RNG state
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=attn_mask,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=self.softmax_scale,
                )
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
