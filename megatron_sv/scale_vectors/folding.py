"""Fold scale vectors into a linear map's weight: W_eff = diag(u) W diag(gamma_b), one GEMM.

A fused projection (linear_qkv, linear_fc1, the router) is seen as a weight of shape
[groups, slots, rows, in]: for linear_qkv groups are the local query groups and slots are
[q heads of the group..., k, v]; for a gated linear_fc1 there is one group and the slots are [gate, up].
Input-side vectors are given per slot ([slots, in]); output-side vectors per row ([groups, slots, rows]).

``FoldScaleVectors`` is an autograd function that saves only W and the small vectors, never a folded
copy: backward recomputes what it needs (docs/scale_vectors.md, "How it is computed"). Together with
``recompute_saved_weight`` the GEMM does not keep W_eff alive between forward and backward either, so
folding costs no activation-lifetime memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class FoldLayout:
    """Row layout of a fused weight: ``groups * slots * rows == out_features``."""

    groups: int
    slots: int
    rows: int

    @property
    def out_features(self) -> int:
        return self.groups * self.slots * self.rows


def _fold(
    weight: torch.Tensor, layout: FoldLayout, in_scales: Optional[torch.Tensor], out_scales: Optional[torch.Tensor]
) -> torch.Tensor:
    w = weight.view(layout.groups, layout.slots, layout.rows, weight.shape[-1])
    if in_scales is not None:
        w = w * in_scales[None, :, None, :]
    if out_scales is not None:
        w = w * out_scales[..., None]
    return w.reshape(weight.shape)


class FoldScaleVectors(torch.autograd.Function):
    """W_eff[g,s,r,:] = u[g,s,r] * W[g,s,r,:] * gamma[s,:] with memory-lean backward."""

    @staticmethod
    def forward(ctx, weight, in_scales, out_scales, layout: FoldLayout):
        ctx.layout = layout
        ctx.save_for_backward(weight, in_scales, out_scales)
        return _fold(weight, layout, in_scales, out_scales)

    @staticmethod
    def backward(ctx, grad_eff):
        # Passes over |W|: grad_w 1-2 writes, g*W 1 write, the vector gradients are contractions of g*W
        # (einsum, no weight-sized temporaries).
        weight, in_scales, out_scales = ctx.saved_tensors
        lay = ctx.layout
        g = grad_eff.reshape(lay.groups, lay.slots, lay.rows, weight.shape[-1])
        w = weight.view_as(g)
        grad_w = grad_in = grad_out = None
        if ctx.needs_input_grad[0]:
            gw = g
            if in_scales is not None:
                gw = gw * in_scales[None, :, None, :]
            if out_scales is not None:
                gw = gw * out_scales[..., None]
            grad_w = gw.reshape(weight.shape)
        need_in = in_scales is not None and ctx.needs_input_grad[1]
        need_out = out_scales is not None and ctx.needs_input_grad[2]
        if need_in or need_out:
            g_times_w = g * w
            if need_in:
                grad_in = (
                    torch.einsum("gsrd,gsr->sd", g_times_w, out_scales)
                    if out_scales is not None
                    else g_times_w.sum(dim=(0, 2))
                )
            if need_out:
                grad_out = (
                    torch.einsum("gsrd,sd->gsr", g_times_w, in_scales)
                    if in_scales is not None
                    else g_times_w.sum(dim=-1)
                )
        return grad_w, grad_in, grad_out, None


def fold_into_weight(
    weight: torch.Tensor,
    layout: FoldLayout,
    in_scales: Optional[torch.Tensor] = None,
    out_scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """diag(u) W diag(gamma_slot); returns ``weight`` itself when there is nothing to fold."""
    if in_scales is None and out_scales is None:
        return weight
    if weight.shape[0] != layout.out_features:
        raise ValueError(f"weight has {weight.shape[0]} rows, layout expects {layout.out_features}")
    return FoldScaleVectors.apply(weight, in_scales, out_scales, layout)


@contextlib.contextmanager
def recompute_saved_weight(folded: torch.Tensor, refold):
    """While active, autograd does not keep ``folded`` alive: it saves a recipe and refolds on use.

    ``refold()`` must recompute the same tensor from parameters (which do not change before backward).
    """
    target = folded
    if not target.is_contiguous():
        raise ValueError("recompute_saved_weight expects a contiguous folded weight")
    ptr, numel = target.data_ptr(), target.numel()

    def pack(t):
        # Autograd may save a view (e.g. the transpose used by the GEMM): match by storage and
        # remember the view's geometry so the refolded tensor can be viewed the same way.
        if t.data_ptr() == ptr and t.numel() == numel and t.dtype == target.dtype:
            return _Refold(refold, t.shape, t.stride())
        return t

    def unpack(obj):
        if isinstance(obj, _Refold):
            with torch.no_grad():
                fresh = obj.refold()
            return fresh.as_strided(obj.shape, obj.stride)
        return obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Refold:
    __slots__ = ("refold", "shape", "stride")

    def __init__(self, refold, shape, stride):
        self.refold, self.shape, self.stride = refold, shape, stride
