"""RMSNorm / LayerNorm modules for Megatron-Core specs that work under sequence parallelism.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under SP a norm sees only this
rank's sequence shard, so its weight gradient is partial; marking the weight (and bias) with
``sequence_parallel = True`` makes ``finalize_model_grads`` all-reduce it over the TP group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SPNorm(torch.nn.Module):
    """``config.normalization`` ("RMSNorm" or "LayerNorm") over the last dimension, computed in
    fp32, with a learnable weight (plus a bias for LayerNorm). Honors
    ``config.layernorm_zero_centered_gamma`` (weight stored as gamma - 1)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        self.config = config
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.params_dtype
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for p in self.parameters():
            # read by finalize_model_grads: all-reduce over TP when the input is sequence-sharded
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.rms:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            y = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=self.eps)
        w = self.weight.float()
        if self.zero_centered_gamma:
            w = w + 1.0
        y = y * w
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
