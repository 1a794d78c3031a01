"""The FP8 linear map of a tensor-parallel layer: forward, dgrad and wgrad GEMMs on torch._scaled_mm.

``fp8_parallel_linear`` has the contract of Megatron-Core's
``linear_with_grad_accumulation_and_async_allreduce``: under sequence parallelism it all-gathers the input
in forward and in backward (to form the weight gradient) and reduce-scatters the input gradient; with
``allreduce_dgrad`` it all-reduces the input gradient. Only the three GEMMs change:

    forward  y  = x  @ W^T    x e4m3 (scaled per tensor / per token),   W e4m3 (per tensor / per output row)
    dgrad    dx = g  @ W      g e4m3|e5m2 (per tensor / per token),     W e4m3 (per tensor / per input column)
    wgrad    dW = g^T @ x     g^T (per tensor / per output row),        x (per tensor / per input column)

W's FP8 copies come from ``FP8WeightCache``: made once per parameters generation (optimizer step), reused
by every micro-batch. W is what the layer's fold plan gives the GEMM (scale_vectors/step_fold.py): under
mixed precision the bf16 weight, which holds W_eff for a layer with folded scale vectors; its gradient
(dL/dW_eff) goes to the weight's fp32 ``main_grad`` through Megatron's DDP hook.
Amaxes taken across a tensor-parallel shard boundary are all-reduced (see quantize.py), so results do not
depend on the TP degree. The token count of the wgrad contraction is zero-padded to a multiple of 16
(MoE experts see any number of tokens); zero rows change neither the amax nor the sum.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sv.scale_vectors.training_hooks import parameters_generation

from .quantize import FP8Operand, quantize, scaled_mm
from .recipe import FP8_DIM_MULTIPLE, FP8Recipe


@dataclass(frozen=True)
class TPShards:
    """Which GEMM dimension of this layer is split over ``group``: the input features (row-parallel) or
    the output features (column-parallel). Decides which amaxes need a cross-rank MAX."""

    group: Optional[dist.ProcessGroup]
    input_sharded: bool  # row-parallel: x [T, K/tp], W [N, K/tp]
    output_sharded: bool  # column-parallel: W [N/tp, K], g [T, N/tp]

    def over(self, crosses: bool) -> Optional[dist.ProcessGroup]:
        if not crosses or self.group is None or dist.get_world_size(self.group) == 1:
            return None
        return self.group


@dataclass
class FP8Weight:
    """W's FP8 copies: ``fwd`` is W^T as the right operand of the forward GEMM ([K, N], column-major);
    ``dgrad`` is W as the right operand of the dgrad GEMM ([N, K], column-major)."""

    fwd: FP8Operand
    dgrad: FP8Operand


def quantize_weight(weight: torch.Tensor, recipe: FP8Recipe, shards: TPShards) -> FP8Weight:
    w = weight.detach()
    if recipe.rowwise:
        # forward: one scale per output row of W (a column of the GEMM's right operand), over K
        fwd = quantize(w, recipe.forward_dtype, True, shards.over(shards.input_sharded)).t()
        # dgrad contracts over N: one scale per input column of W, over N
        dgrad = quantize(w.t(), recipe.forward_dtype, True, shards.over(shards.output_sharded)).t()
    else:
        q = quantize(w, recipe.forward_dtype, False, shards.over(True))
        fwd = q.t()
        dgrad = FP8Operand(q.data.t().contiguous().t(), q.inv_scale)  # same bits, column-major [N, K]
    return FP8Weight(fwd, dgrad)


def cast_source(weight: torch.Tensor) -> torch.Tensor:
    """The tensor whose values ``weight`` shows: a cached per-step fold reaches the GEMM as a fresh autograd
    view of the same W_eff in every micro-batch (step_fold._StepFoldedWeight); the cast is keyed on W_eff."""
    return weight if weight._base is None else weight._base


class FP8WeightCache:
    """A weight's FP8 copies, made once per parameters generation and never stale.

    The weight is what the linear's fold plan hands the GEMM (step_fold.py): the parameter itself (W, or
    W_eff under mixed precision, where the optimizer's master -> model copy writes the fold), or a cached
    fp32 W_eff. The key is that tensor (by weak reference: a dead one never matches, and the cache keeps no
    fold alive), its version counter and ``parameters_generation()`` (bumped after every optimizer step and
    checkpoint load; writes through ``.data`` or a parameter all-gather do not bump the version counter).
    """

    def __init__(self):
        self._source: Optional[weakref.ref] = None
        self._key = None
        self._value: Optional[FP8Weight] = None
        self.casts = 0  # how many times the weight was quantized (tests count it)

    def get(self, weight: torch.Tensor, recipe: FP8Recipe, shards: TPShards) -> FP8Weight:
        source = cast_source(weight)
        key = (parameters_generation(), source._version, recipe)
        if self._source is None or self._source() is not source or self._key != key:
            self._value = quantize_weight(weight, recipe, shards)
            self._source, self._key = weakref.ref(source), key
            self.casts += 1
        return self._value

    def clear(self) -> None:
        self._source = self._key = self._value = None


def _gemm_out_dtype(x: torch.Tensor, recipe: FP8Recipe) -> torch.dtype:
    # bf16 is the production output; fp32 activations (the test precision) get fp32 GEMM outputs so that
    # layouts can be compared tightly. CUDA's rowwise kernel writes bf16 only.
    if x.dtype == torch.float32 and not (recipe.rowwise and x.is_cuda):
        return torch.float32
    return torch.bfloat16


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[0] % FP8_DIM_MULTIPLE
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def _all_gather_sequence(t: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((t.shape[0] * dist.get_world_size(group), *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


class FP8ParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        fp8w: FP8Weight,
        recipe: FP8Recipe,
        shards: TPShards,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        tp_group,
    ):
        total = _all_gather_sequence(input, tp_group) if sequence_parallel else input
        x = total.reshape(-1, total.shape[-1])
        xq = quantize(x, recipe.forward_dtype, recipe.rowwise, shards.over(shards.input_sharded))
        out = scaled_mm(xq, fp8w.fwd, _gemm_out_dtype(x, recipe), fast_accum=True).to(input.dtype)
        out = out.view(*total.shape[:-1], out.shape[-1])
        if bias is not None:
            out = out + bias
        # Tensorwise without SP: the wgrad reuses the forward's FP8 input (the same bits it would re-cast),
        # so 1 byte per element stays alive instead of 2. Rowwise scales x per column for the wgrad (a
        # different cast); under SP the local bf16 shard is kept and re-gathered, as Megatron does.
        ctx.keep_fp8_input = not recipe.rowwise and not sequence_parallel
        if ctx.keep_fp8_input:
            ctx.save_for_backward(xq.data, xq.inv_scale)
        else:
            ctx.save_for_backward(input)
        ctx.input_dtype = input.dtype
        ctx.fp8w, ctx.recipe, ctx.shards = fp8w, recipe, shards
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = allreduce_dgrad, sequence_parallel, tp_group
        ctx.use_bias, ctx.weight_dtype = bias is not None, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        recipe, shards, fp8w = ctx.recipe, ctx.shards, ctx.fp8w
        if ctx.keep_fp8_input:
            x_data, x_inv = ctx.saved_tensors
            input = None
        else:
            (input,) = ctx.saved_tensors
        g = grad_output.reshape(-1, grad_output.shape[-1])
        need_wgrad = ctx.needs_input_grad[1]
        total = None
        if need_wgrad and input is not None:
            total = _all_gather_sequence(input, ctx.tp_group) if ctx.sequence_parallel else input
        out_dtype = _gemm_out_dtype(g, recipe)

        # dgrad: dx = g @ W
        gq = quantize(g, recipe.grad_dtype, recipe.rowwise, shards.over(shards.output_sharded))
        grad_input = scaled_mm(gq, fp8w.dgrad, out_dtype).to(ctx.input_dtype)
        grad_input = grad_input.view(*grad_output.shape[:-1], grad_input.shape[-1])
        if ctx.sequence_parallel:
            sub = torch.empty_like(input)
            dist.reduce_scatter_tensor(sub, grad_input.contiguous(), group=ctx.tp_group)
            grad_input = sub
        elif ctx.allreduce_dgrad:
            dist.all_reduce(grad_input, group=ctx.tp_group)

        # wgrad: dW = g^T @ x, contracted over tokens (padded to a multiple of 16)
        grad_weight = None
        if need_wgrad and g.shape[0] == 0:  # an MoE expert without tokens (the same on its TP ranks)
            grad_weight = torch.zeros(fp8w.dgrad.data.shape, dtype=ctx.weight_dtype, device=g.device)
        elif need_wgrad:
            if recipe.rowwise:
                x = total.reshape(-1, total.shape[-1])
                gp, xp = _pad_rows(g), _pad_rows(x)
                g_t = quantize(gp.t(), recipe.grad_dtype, True)  # per output row, over tokens
                x_t = quantize(xp.t(), recipe.forward_dtype, True).t()  # per input column, over tokens
            else:
                # the same bits and scales as the dgrad / forward casts (tensorwise scales ignore layout)
                if ctx.keep_fp8_input:
                    xq = FP8Operand(x_data, x_inv)
                else:
                    x = total.reshape(-1, total.shape[-1])
                    xq = quantize(x, recipe.forward_dtype, False, shards.over(shards.input_sharded))
                g_t = FP8Operand(
                    _pad_rows(gq.data.view(torch.uint8)).view(gq.data.dtype).t().contiguous(), gq.inv_scale
                )
                x_t = FP8Operand(_pad_rows(xq.data.view(torch.uint8)).view(xq.data.dtype), xq.inv_scale)
                x_t = FP8Operand(x_t.data.t().contiguous().t(), x_t.inv_scale)
            grad_weight = scaled_mm(g_t, x_t, out_dtype).to(ctx.weight_dtype)
        grad_bias = g.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def fp8_parallel_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    fp8w: FP8Weight,
    recipe: FP8Recipe,
    shards: TPShards,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    tp_group=None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with FP8 GEMMs; ``fp8w`` must be W's copies from ``FP8WeightCache``."""
    if (sequence_parallel or allreduce_dgrad) and tp_group is None:
        raise ValueError("sequence parallelism / dgrad all-reduce need the tensor-parallel group")
    if sequence_parallel and allreduce_dgrad:
        raise ValueError("sequence parallelism reduce-scatters the input gradient; allreduce_dgrad must be off")
    if input.is_cuda and recipe.rowwise and input.dtype != torch.bfloat16:
        raise ValueError("rowwise FP8 on CUDA writes bf16 GEMM outputs: run with --bf16")
    return FP8ParallelLinear.apply(
        input, weight, bias, fp8w, recipe, shards, allreduce_dgrad, sequence_parallel, tp_group
    )
