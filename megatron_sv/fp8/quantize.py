"""Dynamic FP8 casts and the scaled GEMM (torch._scaled_mm), with the layout rules of CUDA enforced everywhere.

``quantize(t, dtype, rowwise, group)`` casts a 2-D tensor to FP8 with scale = max(dtype) / amax, where amax
is taken over the whole tensor (tensorwise) or over each row (rowwise); it returns the FP8 tensor and the
fp32 *dequantization* factor 1/scale that torch._scaled_mm multiplies back in. When the tensor is one
shard of a tensor-parallel operand and the amax axis crosses the shards, ``group`` all-reduces the amax
(MAX), so the FP8 bits and scales are the same at every TP degree (a TP2 run computes what TP1 does).

``scaled_mm(a, b)`` multiplies a [M, K] by b [K, N]: a row-major, b column-major, K and N multiples of 16,
rowwise scales [M, 1] and [1, N], the right operand in e4m3 for rowwise scaling. CUDA requires all of this;
the CPU kernel does not, so checking it here keeps CPU tests honest about what runs on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sv.scale_vectors.inner_norms import kernel, kernel_mode

from .recipe import FP8_DIM_MULTIPLE, FP8Unsupported

_EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale


@dataclass
class FP8Operand:
    """An FP8 tensor and its fp32 dequantization factor (0-dim: tensorwise; [M, 1] or [1, N]: rowwise)."""

    data: torch.Tensor
    inv_scale: torch.Tensor

    def t(self) -> "FP8Operand":
        """The transpose: a view of the same bits (row-major becomes column-major) and transposed scales."""
        inv = self.inv_scale if self.inv_scale.dim() == 0 else self.inv_scale.t()
        return FP8Operand(self.data.t(), inv)

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.inv_scale


# The kernel bodies: written once, run eagerly or through torch.compile (see _kernel).
def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.abs().amax().float()


def _row_amax(t: torch.Tensor) -> torch.Tensor:
    return t.abs().amax(dim=1, keepdim=True).float()


def _cast(t: torch.Tensor, scale: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


def _kernel(fn, device: torch.device):
    """On CUDA, torch.compile'd where Triton exists (one fused pass per amax and per cast instead of
    several with fp32 temporaries; MEGATRON_SV_FUSED_KERNELS=eager turns it off). On CPU eager, unless
    MEGATRON_SV_FUSED_KERNELS=compiled: the CPU path serves tests, where compile time would dominate."""
    if device.type == "cuda" or kernel_mode() == "compiled":
        return kernel(fn, device)
    return fn


def quantize(
    t: torch.Tensor, dtype: torch.dtype, rowwise: bool, group: Optional[dist.ProcessGroup] = None
) -> FP8Operand:
    """Cast a 2-D tensor to ``dtype`` with a scale from its current amax (per row if ``rowwise``).

    The result is row-major (contiguous) whatever the layout of ``t``.
    """
    if t.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(t.shape)}")
    with torch.no_grad():
        t = t.detach()
        if rowwise:
            amax = _kernel(_row_amax, t.device)(t)
        else:  # an MoE expert can receive no token: its amax is 0 (and the TP collective below still runs)
            amax = _kernel(_amax, t.device)(t) if t.numel() else torch.zeros((), dtype=torch.float32, device=t.device)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        fmax = torch.finfo(dtype).max
        # fp64 for the division, as torchao does, so the scale does not depend on how it is computed
        scale = (fmax / amax.double().clamp(min=_EPS)).float()
        data = _kernel(_cast, t.device)(t, scale, fmax, dtype).contiguous()
        return FP8Operand(data, scale.reciprocal())


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and (t.size(0) == 1 or t.stride(0) >= t.size(1))


def scaled_mm(a: FP8Operand, b: FP8Operand, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a.data [M, K] @ b.data [K, N] * scales, accumulated in fp32, returned as ``out_dtype``.

    ``fast_accum``: Hopper's faster, less often promoted accumulation (torchao and Transformer Engine use it
    for the forward GEMM only; gradients keep the exact fp32 accumulation). No effect on CPU."""
    (m, k), (k2, n) = a.data.shape, b.data.shape
    if k != k2:
        raise ValueError(f"scaled_mm: inner sizes differ ({k} vs {k2})")
    if k % FP8_DIM_MULTIPLE or n % FP8_DIM_MULTIPLE:
        raise FP8Unsupported(
            f"torch._scaled_mm needs the contraction ({k}) and output ({n}) sizes divisible by {FP8_DIM_MULTIPLE}"
        )
    if not _is_row_major(a.data) or not _is_row_major(b.data.t()):
        raise ValueError("scaled_mm: the left operand must be row-major and the right one column-major")
    rowwise = a.inv_scale.dim() == 2
    if rowwise:
        if tuple(a.inv_scale.shape) != (m, 1) or tuple(b.inv_scale.shape) != (1, n):
            raise ValueError(
                f"rowwise scales must be [{m}, 1] and [1, {n}], got "
                f"{tuple(a.inv_scale.shape)} and {tuple(b.inv_scale.shape)}"
            )
        if b.data.dtype != torch.float8_e4m3fn:
            raise ValueError("rowwise scaling needs the right operand in e4m3 (CUDA's rowwise kernel)")
    elif a.data.dtype == torch.float8_e5m2 and b.data.dtype == torch.float8_e5m2:
        raise ValueError("scaled_mm: at most one operand may be e5m2")
    return torch._scaled_mm(
        a.data,
        b.data,
        scale_a=a.inv_scale.contiguous(),
        scale_b=b.inv_scale.contiguous(),
        out_dtype=out_dtype,
        use_fast_accum=fast_accum and a.data.is_cuda,
    )
