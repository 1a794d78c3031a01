"""DNP's inner norms: z = u * N(x) per attention head (q/k) or over the whole ffn width (gate/up), fused.

The inner norms act on activations, so unlike the other vectors they cannot be folded into a weight. As
separate eager ops (upcast, square, sum, scale, multiply by u, cast, split, silu, multiply) every step reads
and writes a whole activation. Fused, the GEMM output is read once and the result written once, forward
and backward; gate/up's norm is fused with SwiGLU, whose backward recomputes N(x) from the saved GEMM
output instead of keeping the normalized copy and silu's input alive.

The kernel bodies below are plain tensor functions written once. They run through ``torch.compile`` (C++
on CPU, Triton on GPU) or eagerly, chosen by ``MEGATRON_SV_FUSED_KERNELS`` = ``compiled`` | ``eager``;
the default is ``compiled`` where a compiler exists (a C++ compiler on CPU, Triton on CUDA).

Tensor parallelism: gate/up are normalized over the whole ffn width, which TP shards. The row statistics
are then partial sums, all-reduced between two kernels (one or two floats per row and branch), forward and
backward, so the op computes the same function at any TP degree. With complete rows (TP1, per-head norms)
each direction is one kernel.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .norms import upcast as _upcast

KERNELS_ENV = "MEGATRON_SV_FUSED_KERNELS"
KERNEL_MODES = ("compiled", "eager")


# -- kernel bodies (pure tensor math; compiled or run as is) ----------------------------------------------
def _row_sums(xf: torch.Tensor, kind: str) -> torch.Tensor:
    """Partial row sums over the last dim: [sum x^2] (RMSNorm) or [sum x, sum x^2] (LayerNorm)."""
    if kind == "RMSNorm":
        return xf.square().sum(-1, keepdim=True)
    return torch.cat([xf.sum(-1, keepdim=True), xf.square().sum(-1, keepdim=True)], dim=-1)


def _row_stats(sums, kind: str, width: int, eps: float, active=None):
    """(mean or None, 1/std) from the (global) row sums; rows where ``active`` is False: N = identity."""
    mean = None
    if kind == "RMSNorm":
        rstd = torch.rsqrt(sums / width + eps)
    else:
        mean = sums[..., :1] / width
        rstd = torch.rsqrt((sums[..., 1:] / width - mean.square()).clamp_min(0.0) + eps)
    if active is not None:
        rstd = torch.where(active, rstd, torch.ones_like(rstd))
        if mean is not None:
            mean = torch.where(active, mean, torch.zeros_like(mean))
    return mean, rstd


def _normalized(xf, sums, kind: str, width: int, eps: float, active=None):
    """N(x) and 1/std."""
    mean, rstd = _row_stats(sums, kind, width, eps, active)
    return (xf * rstd if mean is None else (xf - mean) * rstd), rstd


def _backward_sums(gn, n, kind: str):
    """The row sums that the norm's backward needs (partial under TP): [gn.n] or [sum gn, gn.n]."""
    if kind == "RMSNorm":
        return (gn * n).sum(-1, keepdim=True)
    return torch.cat([gn.sum(-1, keepdim=True), (gn * n).sum(-1, keepdim=True)], dim=-1)


def _norm_input_grad(gn, n, rstd, bsums, kind: str, width: int, active=None):
    """dL/dx of N from dL/dN, given the global backward row sums; inactive rows: dL/dx = dL/dN."""
    if active is not None:
        bsums = bsums * active.to(bsums.dtype)
    bsums = bsums / width
    if kind == "RMSNorm":
        return rstd * (gn - n * bsums)
    return rstd * (gn - bsums[..., :1] - n * bsums[..., 1:])


def _swiglu_grads(gy, n, uf):
    """dL/dz for z = u*N (stacked [gate, up] on dim 1) of y = silu(z_gate) * z_up."""
    z = n * uf
    a, b = z[:, 0], z[:, 1]
    sig = torch.sigmoid(a)
    ga = gy * b * sig * (1.0 + a * (1.0 - sig))
    gb = gy * (a * sig)
    return torch.stack([ga, gb], dim=1)


def row_sums(x, kind: str):
    """Partial row sums of x in >= fp32 (all-reduced over TP before use)."""
    return _row_sums(_upcast(x), kind)


def norm_swiglu_apply(x, sums, u, kind: str, width: int, eps: float):
    """y = silu(u_g N(gate)) * u_u N(up); x: [rows, 2, f] (gate, up), u: [2, f], sums: global row sums."""
    n, _ = _normalized(_upcast(x), sums, kind, width, eps)
    z = n * _upcast(u)
    return (F.silu(z[:, 0]) * z[:, 1]).to(x.dtype)


def norm_swiglu_forward(x, u, kind: str, width: int, eps: float):
    """One-kernel forward when the row is complete (no TP): (y, row sums)."""
    sums = row_sums(x, kind)
    return norm_swiglu_apply(x, sums, u, kind, width, eps), sums


def norm_swiglu_backward_sums(gy, x, sums, u, kind: str, width: int, eps: float):
    """First half of the backward: (partial backward row sums, dL/du)."""
    uf = _upcast(u)
    n, _ = _normalized(_upcast(x), sums, kind, width, eps)
    gz = _swiglu_grads(_upcast(gy), n, uf)
    return _backward_sums(gz * uf, n, kind), (gz * n).sum(0).to(u.dtype)


def norm_swiglu_backward_input(gy, x, sums, u, bsums, kind: str, width: int, eps: float):
    """Second half of the backward: dL/dx from the global backward row sums."""
    uf = _upcast(u)
    n, rstd = _normalized(_upcast(x), sums, kind, width, eps)
    gn = _swiglu_grads(_upcast(gy), n, uf) * uf
    return _norm_input_grad(gn, n, rstd, bsums, kind, width).to(x.dtype)


def norm_swiglu_backward(gy, x, sums, u, kind: str, width: int, eps: float):
    """One-kernel backward when the row is complete (no TP): (dL/dx, dL/du)."""
    uf = _upcast(u)
    n, rstd = _normalized(_upcast(x), sums, kind, width, eps)
    gz = _swiglu_grads(_upcast(gy), n, uf)
    gn = gz * uf
    grad_x = _norm_input_grad(gn, n, rstd, _backward_sums(gn, n, kind), kind, width)
    return grad_x.to(x.dtype), (gz * n).sum(0).to(u.dtype)


def scaled_norm_apply(x, sums, u, kind: str, width: int, eps: float, active=None):
    """z = u * N(x) from the global row sums."""
    n, _ = _normalized(_upcast(x), sums, kind, width, eps, active)
    return (n * _upcast(u)).to(x.dtype)


def scaled_norm_forward(x, u, kind: str, width: int, eps: float, active=None):
    """One-kernel forward when the row is complete: (z, row sums)."""
    sums = row_sums(x, kind)
    return scaled_norm_apply(x, sums, u, kind, width, eps, active), sums


def _scaled_norm_recompute(saved, u, sums, kind: str, width: int, eps: float, from_output: bool, active):
    """N(x) and 1/std for the backward, from the saved output z (N = z / u) or the saved input x."""
    uf = _upcast(u)
    if from_output:
        return _upcast(saved) / uf, _row_stats(sums, kind, width, eps, active)[1], uf
    n, rstd = _normalized(_upcast(saved), sums, kind, width, eps, active)
    return n, rstd, uf


def scaled_norm_backward_sums(gz, saved, u, sums, kind: str, width: int, eps: float, from_output: bool, active=None):
    """First half of the backward: (partial backward row sums, dL/du)."""
    n, _, uf = _scaled_norm_recompute(saved, u, sums, kind, width, eps, from_output, active)
    gzf = _upcast(gz)
    return _backward_sums(gzf * uf, n, kind), (gzf * n).reshape(-1, *u.shape).sum(0).to(u.dtype)


def scaled_norm_backward_input(
    gz, saved, u, sums, bsums, kind: str, width: int, eps: float, from_output: bool, active=None
):
    """Second half of the backward: dL/dx from the global backward row sums."""
    n, rstd, uf = _scaled_norm_recompute(saved, u, sums, kind, width, eps, from_output, active)
    return _norm_input_grad(_upcast(gz) * uf, n, rstd, bsums, kind, width, active).to(gz.dtype)


def scaled_norm_backward(gz, saved, u, sums, kind: str, width: int, eps: float, from_output: bool, active=None):
    """One-kernel backward when the row is complete: (dL/dx, dL/du)."""
    n, rstd, uf = _scaled_norm_recompute(saved, u, sums, kind, width, eps, from_output, active)
    gzf = _upcast(gz)
    gn = gzf * uf
    grad_x = _norm_input_grad(gn, n, rstd, _backward_sums(gn, n, kind), kind, width, active)
    return grad_x.to(gz.dtype), (gzf * n).reshape(-1, *u.shape).sum(0).to(u.dtype)


# -- kernel selection -------------------------------------------------------------------------------------
def kernel_mode() -> str:
    """``compiled`` or ``eager`` (MEGATRON_SV_FUSED_KERNELS; default compiled where a compiler exists)."""
    mode = os.environ.get(KERNELS_ENV, "").strip().lower()
    if mode and mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV} must be one of {list(KERNEL_MODES)}, got {mode!r}")
    return mode or "auto"


@functools.lru_cache(maxsize=None)
def compiler_available(device_type: str) -> bool:
    """torch.compile needs Triton for CUDA tensors and a C++ compiler for CPU tensors."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401, PLC0415 - probe only
        except ImportError:
            return False
        return True
    if device_type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    return False


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    # dynamic=None: the first shape compiles static, a second one recompiles with dynamic sizes.
    return torch.compile(fn, dynamic=None)


def kernel(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled or as is, per ``kernel_mode()`` and the tensors' device."""
    mode = kernel_mode()
    if mode == "compiled" or (mode == "auto" and compiler_available(device.type)):
        return _compiled(fn)
    return fn


def _tp(group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    return group if group is not None and dist.get_world_size(group) > 1 else None


# -- autograd functions -----------------------------------------------------------------------------------
class _NormSwiGLU(torch.autograd.Function):
    """y = silu(u_gate N(gate)) * u_up N(up) on x = [rows, 2, f]; saves x, u and the row sums only."""

    @staticmethod
    def forward(ctx, x, u, kind, eps, width, group):
        if group is None:
            y, sums = kernel(norm_swiglu_forward, x.device)(x, u, kind, width, eps)
        else:
            sums = kernel(row_sums, x.device)(x, kind)
            dist.all_reduce(sums, group=group)
            y = kernel(norm_swiglu_apply, x.device)(x, sums, u, kind, width, eps)
        ctx.kind, ctx.eps, ctx.width, ctx.group = kind, eps, width, group
        ctx.save_for_backward(x, u, sums)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, u, sums = ctx.saved_tensors
        args = (ctx.kind, ctx.width, ctx.eps)
        if ctx.group is None:
            grad_x, grad_u = kernel(norm_swiglu_backward, x.device)(gy, x, sums, u, *args)
        else:
            bsums, grad_u = kernel(norm_swiglu_backward_sums, x.device)(gy, x, sums, u, *args)
            dist.all_reduce(bsums, group=ctx.group)
            grad_x = kernel(norm_swiglu_backward_input, x.device)(gy, x, sums, u, bsums, *args)
        return grad_x, grad_u, None, None, None, None


def norm_swiglu(
    x: torch.Tensor,
    u_gate: torch.Tensor,
    u_up: torch.Tensor,
    kind: str,
    eps: float,
    full_width: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """silu(u_gate * N(gate)) * (u_up * N(up)) for x = [..., gate | up] (a TP rank's fc1 output).

    N normalizes gate and up each over ``full_width`` (the global ffn width; default: the local one), its
    statistics all-reduced over ``group`` when the width is TP-sharded.
    """
    f = x.shape[-1] // 2
    width = full_width if full_width is not None else f
    u = torch.stack([u_gate, u_up])
    y = _NormSwiGLU.apply(x.reshape(-1, 2, f), u, kind, eps, width, _tp(group))
    return y.view(*x.shape[:-1], f)


_MIN_SCALE_FOR_OUTPUT_RECOMPUTE = 1e-2


class _ScaledInnerNorm(torch.autograd.Function):
    """z = u * N(x) over the last dimension (optionally sharded over ``group``), memory-lean.

    Saves only its output (which the next op keeps anyway: attention keeps v, a view of it), u and the row
    sums, and recomputes N(x) = z / u in backward, so DNP's activation memory stays at `standard`'s.
    """

    @staticmethod
    def forward(ctx, x, u, kind, eps, width, group, active):
        if group is None:
            z, sums = kernel(scaled_norm_forward, x.device)(x, u, kind, width, eps, active)
        else:
            sums = kernel(row_sums, x.device)(x, kind)
            dist.all_reduce(sums, group=group)
            z = kernel(scaled_norm_apply, x.device)(x, sums, u, kind, width, eps, active)
        ctx.kind, ctx.eps, ctx.width, ctx.group, ctx.active = kind, eps, width, group, active
        # N(x) = z / u is exact enough unless some u_j is tiny; then save x instead.
        ctx.from_output = bool((u.detach().abs() >= _MIN_SCALE_FOR_OUTPUT_RECOMPUTE).all())
        ctx.save_for_backward(z if ctx.from_output else x, u, sums)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        saved, u, sums = ctx.saved_tensors
        args = (ctx.kind, ctx.width, ctx.eps, ctx.from_output, ctx.active)
        if ctx.group is None:
            grad_x, grad_u = kernel(scaled_norm_backward, saved.device)(grad_z, saved, u, sums, *args)
        else:
            bsums, grad_u = kernel(scaled_norm_backward_sums, saved.device)(grad_z, saved, u, sums, *args)
            dist.all_reduce(bsums, group=ctx.group)
            grad_x = kernel(scaled_norm_backward_input, saved.device)(grad_z, saved, u, sums, bsums, *args)
        return grad_x, grad_u, None, None, None, None, None


def scaled_inner_norm(
    x: torch.Tensor,
    u: torch.Tensor,
    kind: str,
    eps: float,
    full_width: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """u * N(x) with N over the last dimension; ``u`` broadcasts against x's trailing dimensions.

    With ``group`` the last dimension is a shard of a row of global width ``full_width`` and the row
    statistics are all-reduced, so the result does not depend on the TP degree. ``active`` (bool,
    broadcastable to x's shape with a last dimension of 1) marks the rows that are normalized; the others
    pass through as u * x, so a fused projection is handled in one call without splitting and re-joining.
    """
    width = full_width if full_width is not None else x.shape[-1]
    return _ScaledInnerNorm.apply(x, u, kind, eps, width, _tp(group), active)
