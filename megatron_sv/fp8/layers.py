"""Megatron-Core parallel linears whose GEMMs run in FP8 (the local backend's ``--fp8-format``).

Each class is its bf16 counterpart with ``_forward_impl`` (the GEMM + tensor-parallel communication that
Megatron's ``forward`` delegates to) replaced by ``fp8_parallel_linear``. Everything else (SP input
handling, output reductions, bias, checkpoint schema) is inherited, so an FP8 model has exactly the
parameters and checkpoint keys of the bf16 one: checkpoints move freely between FP8 and bf16 runs.

Scale vectors (``FP8ScaledColumnParallelLinear``) fold exactly as in bf16 (scale_vectors/step_fold.py): under
mixed precision the bf16 model weight holds W_eff = diag(u) W diag(gamma_b), written from the fp32 masters
at the optimizer's master -> model copy; the FP8 cast of that weight, once per parameters generation, is
the only pass over it per step, so gamma_b (one per branch: it cannot ride on the shared activation) and u
are inside the weight's quantization. dL/dW_eff accumulates in fp32 ``main_grad`` and the chain rule to W
and the vectors runs once per step (``training_hooks.before_optimizer_step``). Under rowwise scaling each
output row of W_eff gets its own scale, so |u_r| lands in that row's fp32 scale (see docs/fp8.md for the
error model).
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_sv.scale_vectors.linears import PostNormRowParallelLinear, ScaledColumnParallelLinear

from .linear import FP8WeightCache, TPShards, fp8_parallel_linear
from .recipe import FP8Recipe, check_fp8_device, check_fp8_dims


class FP8LinearMixin:
    """Put before a Megatron parallel linear in the bases; ``fp8`` is the recipe."""

    _column_parallel: bool
    casts_weight = True  # the weight's FP8 cast copies it: fold once per step, in fp32 too (step_fold.py)

    def __init__(self, *args, fp8: FP8Recipe, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp8 = fp8
        self.fp8_weights = FP8WeightCache()
        self._fp8_device_checked = False
        # the wgrad GEMM returns the gradient; Megatron's fused main_grad accumulation is a bf16 kernel
        self.gradient_accumulation_fusion = False
        if self._column_parallel:
            in_f, out_f = self.input_size, self.output_size_per_partition
        else:
            in_f, out_f = self.input_size_per_partition, self.output_size
        check_fp8_dims(
            f"{type(self).__name__} ({self.input_size} -> {self.output_size})",
            input_features=in_f,
            output_features=out_f,
        )
        tp_group = getattr(self, "tp_group", None)
        self._fp8_shards = TPShards(
            group=tp_group, input_sharded=not self._column_parallel, output_sharded=self._column_parallel
        )

    def _forward_impl(
        self,
        input,
        weight,
        bias,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        grad_output_buffer=None,
        wgrad_deferral_limit=None,
        tp_group=None,
        **unused,
    ):
        if grad_output_buffer is not None:
            raise ValueError("deferred embedding wgrad is not supported by FP8 linears")
        if input.is_cuda and not self._fp8_device_checked:  # once: a GPU without FP8 tensor cores
            check_fp8_device(input.device)
            self._fp8_device_checked = True
        fp8w = self.fp8_weights.get(weight, self.fp8, self._fp8_shards)
        return fp8_parallel_linear(
            input,
            weight,
            bias,
            fp8w,
            self.fp8,
            self._fp8_shards,
            allreduce_dgrad=allreduce_dgrad,
            sequence_parallel=sequence_parallel,
            tp_group=tp_group,
        )


class FP8ColumnParallelLinear(FP8LinearMixin, ColumnParallelLinear):
    _column_parallel = True


class FP8RowParallelLinear(FP8LinearMixin, RowParallelLinear):
    _column_parallel = False


class FP8PostNormRowParallelLinear(FP8LinearMixin, PostNormRowParallelLinear):
    _column_parallel = False


class FP8ScaledColumnParallelLinear(FP8LinearMixin, ScaledColumnParallelLinear):
    """Scale vectors folded once per step (step_fold.py); the FP8 cast of W_eff is the step's only pass over W."""

    _column_parallel = True
