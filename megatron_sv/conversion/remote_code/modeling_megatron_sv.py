"""A megatron_sv model for Hugging Face transformers, built from transformers' own Llama modules.

It adds what a stock Llama/Mixtral cannot express (every other scale vector is folded into the weights
at export):
  * DNP inner norms: y_b = u_b * N_b(W_b x) for q, k (N_b per attention head over head_dim) and gate, up
    (N_b over the whole ffn width); u_b is ``<proj>.out_scale``;
  * QK-norm: RMSNorm over head_dim with a learnable scale (``<q|k>_proj.qk_norm_weight``);
  * post-sub-layer Output-Norms (``post_self_attn_layernorm``, ``post_mlp_layernorm``);
  * MoE with Mixtral's routing (softmax over the top-k router logits).
The normalizations are computed in fp32, like megatron_sv. Written by tools/convert_checkpoint.py.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_megatron_sv import MegatronSVConfig


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class HeadNormLinear(nn.Linear):
    """q/k projection followed, per attention head, by N(.) and an output scale u (DNP) and/or a
    QK-norm scale of head_dim entries."""

    def __init__(self, in_features, out_features, head_dim, eps, inner_norm, qk_norm):
        super().__init__(in_features, out_features, bias=False)
        self.head_dim, self.eps = head_dim, eps
        self.out_scale = nn.Parameter(torch.ones(out_features)) if inner_norm else None
        self.qk_norm_weight = nn.Parameter(torch.ones(head_dim)) if qk_norm else None

    def forward(self, x):
        y = super().forward(x)
        shape = y.shape
        y = _rms_normalize(y.view(*shape[:-1], -1, self.head_dim), self.eps)
        if self.out_scale is not None:
            y = y * self.out_scale.view(-1, self.head_dim).to(y.dtype)
        if self.qk_norm_weight is not None:
            y = y * self.qk_norm_weight.to(y.dtype)
        return y.reshape(shape)


class WidthNormLinear(nn.Linear):
    """gate/up projection followed by N(.) over the whole ffn width and an output scale u (DNP)."""

    def __init__(self, in_features, out_features, eps):
        super().__init__(in_features, out_features, bias=False)
        self.eps = eps
        self.out_scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return _rms_normalize(super().forward(x), self.eps) * self.out_scale.to(x.dtype)


class MegatronSVAttention(LlamaAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if config.sv_inner_norm or config.qk_norm:
            h, hd, eps = config.hidden_size, self.head_dim, config.rms_norm_eps
            self.q_proj = HeadNormLinear(
                h, config.num_attention_heads * hd, hd, eps, config.sv_inner_norm, config.qk_norm
            )
            self.k_proj = HeadNormLinear(
                h, config.num_key_value_heads * hd, hd, eps, config.sv_inner_norm, config.qk_norm
            )


class MegatronSVMLP(LlamaMLP):
    def __init__(self, config):
        super().__init__(config)
        if config.sv_inner_norm:
            self.gate_proj = WidthNormLinear(config.hidden_size, config.intermediate_size, config.rms_norm_eps)
            self.up_proj = WidthNormLinear(config.hidden_size, config.intermediate_size, config.rms_norm_eps)


class MegatronSVMoE(nn.Module):
    """Top-k MoE: router logits -> top-k -> softmax over the chosen logits (= Mixtral's renormalized
    softmax) -> weighted sum of the chosen experts (each an MLP like MegatronSVMLP)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList([MegatronSVMLP(config) for _ in range(config.num_local_experts)])

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class MegatronSVDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = MegatronSVAttention(config, layer_idx)
        self.mlp = MegatronSVMoE(config) if config.num_local_experts else MegatronSVMLP(config)
        self.post_norms = bool(config.post_sublayer_norm)
        if self.post_norms:
            self.post_self_attn_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_mlp_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        if not self.post_norms:
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(
            hidden_states=h,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + self.post_self_attn_layernorm(h)
        residual = hidden_states
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + self.post_mlp_layernorm(h)


class MegatronSVPreTrainedModel(LlamaPreTrainedModel):
    config_class = MegatronSVConfig
    _no_split_modules = ["MegatronSVDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        with torch.no_grad():
            for name in ("out_scale", "qk_norm_weight"):
                p = getattr(module, name, None)
                if isinstance(p, nn.Parameter):
                    p.fill_(1.0)


class MegatronSVModel(MegatronSVPreTrainedModel, LlamaModel):
    def __init__(self, config):
        MegatronSVPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MegatronSVDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MegatronSVForCausalLM(MegatronSVPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config):
        MegatronSVPreTrainedModel.__init__(self, config)
        self.model = MegatronSVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["MegatronSVForCausalLM", "MegatronSVModel", "MegatronSVPreTrainedModel"]
