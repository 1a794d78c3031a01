"""Normalizations with (or without) a learnable scale vector, sequence- and tensor-parallel aware.

N(h) is the deterministic part (RMSNorm: h / sqrt(mean(h^2) + eps); LayerNorm: (h - mean) / std); the
scale vector, when present, is a ``ScaleVector`` (plain / OR / ER). Module signatures follow Megatron's
norm builders ``(config, hidden_size, eps)`` so specs can place them in any norm slot.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist

from .config import Role, ScaleVectorConfig
from .tp_ops import sum_grad_over_tp
from .vector import GradReduction, ScaleVector, VectorSpec

NORM_KINDS = ("RMSNorm", "LayerNorm")
InputSplit = Literal["none", "sequence", "heads"]


def default_tp_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state

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


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for norm statistics (bf16/fp16 are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalize(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """N(x) over the last dimension, computed in >= fp32 for stability, returned in x's dtype."""
    xf = _upcast(x)
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

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, sv: ScaleVectorConfig,
                 has_scale: bool, role: Role, input_split: InputSplit = "sequence",
                 tp_group: Optional[dist.ProcessGroup] = None):
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
            spec = VectorSpec(size=hidden_size, role=role, reparam=sv.reparam,
                              grad_reduction=grad_reduction)
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
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = {}
        if self.scale is not None:
            out.update(self.scale.sharded_state_dict(f"{prefix}scale.", sharded_offsets, metadata))
        if self.bias is not None:
            kwargs = {"dp_cp_group": metadata["dp_cp_group"]} if metadata and "dp_cp_group" in metadata else {}
            out.update(make_sharded_tensors_for_checkpoint(
                {"bias": self.bias}, prefix, {}, sharded_offsets, tp_group=self.tp_group, **kwargs))
        return out


_MIN_SCALE_FOR_OUTPUT_RECOMPUTE = 1e-2


class _ScaledInnerNorm(torch.autograd.Function):
    """z = u * N(x) over the last dimension (optionally sharded over ``group``), memory-lean.

    Autograd on the plain formula would keep several full-size intermediates (fp32 copy, squares,
    normalized values) alive until backward; this saves only its output (which the next op keeps
    anyway), u and the per-row statistics, and recomputes N(x) = z / u in backward, which keeps DNP's
    activation memory at `standard`'s.
    """

    @staticmethod
    def _stats(xf, kind, eps, width, group):
        if kind == "RMSNorm":
            sums = xf.square().sum(-1, keepdim=True)
            if group is not None:
                dist.all_reduce(sums, group=group)
            return None, torch.rsqrt(sums / width + eps)
        sums = torch.cat([xf.sum(-1, keepdim=True), xf.square().sum(-1, keepdim=True)], dim=-1)
        if group is not None:
            dist.all_reduce(sums, group=group)
        mean, meansq = sums[..., :1] / width, sums[..., 1:] / width
        return mean, torch.rsqrt((meansq - mean.square()).clamp_min(0.0) + eps)

    @staticmethod
    def forward(ctx, x, u, kind, eps, width, group, active):
        xf = _upcast(x)
        mean, rstd = _ScaledInnerNorm._stats(xf, kind, eps, width, group)
        if active is not None:  # rows of inactive slots pass through unchanged (N = identity)
            rstd = torch.where(active, rstd, torch.ones_like(rstd))
            if mean is not None:
                mean = torch.where(active, mean, torch.zeros_like(mean))
        n = (xf - mean) * rstd if mean is not None else xf * rstd
        z = (n * _upcast(u)).to(x.dtype)
        ctx.kind, ctx.width, ctx.group, ctx.active = kind, width, group, active
        # The consumer (SwiGLU) keeps z for its own backward, so saving z costs no memory while saving x
        # would keep a second activation of this size. N(x) = z / u is exact enough unless some u_j is
        # tiny; then fall back to saving x.
        ctx.from_output = bool((u.detach().abs() >= _MIN_SCALE_FOR_OUTPUT_RECOMPUTE).all())
        ctx.save_for_backward(z if ctx.from_output else x, u,
                              mean if mean is not None else rstd.new_empty(0), rstd)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        saved, u, mean, rstd = ctx.saved_tensors
        gz, uf = _upcast(grad_z), _upcast(u)
        if ctx.from_output:
            n = _upcast(saved) / uf
        else:
            xf = _upcast(saved)
            n = (xf - mean) * rstd if mean.numel() else xf * rstd
        grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = (gz * n).reshape(-1, *u.shape).sum(0).to(u.dtype) if u.dim() else (gz * n).sum()
        gn = gz * uf
        keep = ctx.active.to(gn.dtype) if ctx.active is not None else 1.0  # inactive rows: grad_x = gn
        if ctx.kind == "RMSNorm":
            dot = (gn * n).sum(-1, keepdim=True)
            if ctx.group is not None:
                dist.all_reduce(dot, group=ctx.group)
            grad_x = rstd * (gn - n * (keep * dot / ctx.width))
        else:
            sums = torch.cat([gn.sum(-1, keepdim=True), (gn * n).sum(-1, keepdim=True)], dim=-1)
            if ctx.group is not None:
                dist.all_reduce(sums, group=ctx.group)
            sums = keep * sums / ctx.width
            grad_x = rstd * (gn - sums[..., :1] - n * sums[..., 1:])
        return grad_x.to(grad_z.dtype), grad_u, None, None, None, None, None


def scaled_inner_norm(x: torch.Tensor, u: torch.Tensor, kind: str, eps: float, full_width: Optional[int] = None,
                      group: Optional[dist.ProcessGroup] = None,
                      active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """u * N(x) with N over the last dimension; ``u`` broadcasts against x's trailing dimensions.

    With ``group`` the last dimension is a shard of a row of global width ``full_width`` and the row
    statistics are all-reduced, so the result does not depend on the TP degree. ``active`` (bool,
    broadcastable to x's shape with a last dimension of 1) marks the rows that are normalized; the others
    pass through as u * x, so a fused projection is handled in one call without splitting and re-joining.
    """
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    width = full_width if full_width is not None else x.shape[-1]
    return _ScaledInnerNorm.apply(x, u, kind, eps, width, group, active)
