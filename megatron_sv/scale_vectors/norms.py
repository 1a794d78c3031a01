"""Normalizations with (or without) a learnable scale vector, sequence- and tensor-parallel aware.

N(h) is the deterministic part (RMSNorm: h / sqrt(mean(h^2) + eps); LayerNorm: (h - mean) / std); the
scale vector, when present, is a ``ScaleVector`` (plain / OR / ER). Module signatures follow Megatron's
norm builders ``(config, hidden_size, eps)`` so specs can place them in any norm slot.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from .config import Role, ScaleVectorConfig
from .tp_ops import sum_grad_over_tp
from .vector import GradReduction, ScaleVector, VectorSpec

NORM_KINDS = ("RMSNorm", "LayerNorm")
InputSplit = Literal["none", "sequence", "heads"]


def default_tp_group() -> Optional[dist.ProcessGroup]:
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def resolve_grad_reduction(input_split: InputSplit, config, tp_group) -> GradReduction:
    tp = tp_group.size() if tp_group is not None else 1
    if tp == 1 or input_split == "none":
        return "none"
    if input_split == "heads":
        return "tp_sum"
    if input_split == "sequence":
        return "tp_sum" if config.sequence_parallel else "none"
    raise ValueError(f"unknown input split {input_split!r}")


def check_norm_kind(kind: str) -> str:
    if kind not in NORM_KINDS:
        raise ValueError(f"--normalization must be one of {list(NORM_KINDS)}, got {kind!r}")
    return kind


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for norm statistics (bf16/fp16 are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalize(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """N(x) over the last dimension, computed in >= fp32 for stability, returned in x's dtype."""
    xf = upcast(x)
    if kind == "RMSNorm":
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    else:
        mean = xf.mean(-1, keepdim=True)
        centered = xf - mean
        y = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    return y.to(x.dtype)


class ScaledNorm(torch.nn.Module):
    """y = s * N(x) (+ beta for LayerNorm), s a ScaleVector, or y = N(x) when there is no scale.

    Args:
        has_scale: whether this norm carries a learnable scale vector.
        role: Input-Norm (output feeds a linear map) or Output-Norm (sets a sub-module's output scale).
        input_split: how the TP group splits this norm's input: ``none`` (replicated), ``sequence``
            (split only under sequence parallelism: pre-norms, final norm, post-sub-layer norms) or
            ``heads`` (QK-norm). A split input leaves each rank a partial gradient, summed over TP.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        *,
        sv: ScaleVectorConfig,
        has_scale: bool,
        role: Role,
        input_split: InputSplit = "sequence",
        tp_group: Optional[dist.ProcessGroup] = None,
    ):
        super().__init__()
        if tp_group is None:
            tp_group = default_tp_group()
        grad_reduction = resolve_grad_reduction(input_split, config, tp_group)
        self.kind = check_norm_kind(getattr(config, "normalization", "RMSNorm"))
        self.eps = eps
        self.hidden_size = hidden_size
        self.tp_group = tp_group
        self.grad_reduction = grad_reduction
        self.scale: Optional[ScaleVector] = None
        if has_scale and sv.learnable:
            spec = VectorSpec(size=hidden_size, role=role, reparam=sv.reparam, grad_reduction=grad_reduction)
            self.scale = ScaleVector(spec, tp_group=tp_group, params_dtype=config.params_dtype)
        self.bias = None
        if self.kind == "LayerNorm":
            # LayerNorm's additive shift is not a scale vector; it stays in the norm [OURS].
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = normalize(x, self.kind, self.eps)
        if self.scale is not None:
            y = y * self.scale().to(y.dtype)
        if self.bias is not None:
            b = self.bias
            if self.grad_reduction == "tp_sum":
                b = sum_grad_over_tp(b, self.tp_group)
            y = y + b.to(y.dtype)
        return y

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        out = {}
        if self.scale is not None:
            out.update(self.scale.sharded_state_dict(f"{prefix}scale.", sharded_offsets, metadata))
        if self.bias is not None:
            kwargs = {"dp_cp_group": metadata["dp_cp_group"]} if metadata and "dp_cp_group" in metadata else {}
            out.update(
                make_sharded_tensors_for_checkpoint(
                    {"bias": self.bias}, prefix, {}, sharded_offsets, tp_group=self.tp_group, **kwargs
                )
            )
        return out
