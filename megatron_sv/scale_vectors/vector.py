"""A scale vector and its parameterizations: plain, OR (original space) and ER (exponential space).

OR:  s = beta * sqrt(n) * alpha / |alpha|          beta init 1, alpha init 1
ER:  s = exp(b) * sqrt(n) * exp(a) / |exp(a)|      b init 0, a init 0
A vector whose magnitude a following normalization makes redundant (``direction_only``: DNP's input-side
gamma_b of q, k, gate and up, which feeds the scale-invariant inner norm N_b) keeps only its direction:
beta (exp(b)) is fixed at 1, neither a parameter nor decayed. As a parameter it would get no gradient
(|g| ~ 1e-7, only through the norm's epsilon) while IWD shrinks it as (1 - lr*wd)^t.
sqrt(n)/|alpha| is computed as rsqrt(mean(alpha^2)) so that s is exactly 1 at init (no rounding),
and every strategy without inner norms starts as bit-for-bit the same function as ``standard``.

A vector may be sharded over tensor parallelism (output-side vectors follow their linear map's rows);
then |alpha| is a global statistic, reduced across the TP group so the function does not depend on the
TP degree. Scale vectors never consume random numbers (all inits are constants).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from .config import Reparam, Role
from .tp_ops import all_reduce_sum, sum_grad_over_tp

# Checkpoints written before direction-only vectors existed hold these magnitudes; loading drops them (they
# only ever scaled a quantity that the branch's inner norm normalized away).
DROPPED_MAGNITUDE = re.compile(r"\.input_scales\.(q|k|gate|up|fc1)\.(magnitude|log_magnitude)$")

# How the gradient of a replicated vector is completed across the TP group (see tp_ops).
GradReduction = Literal["none", "tp_sum"]


@dataclass(frozen=True)
class VectorSpec:
    """What a scale vector is: its global length, role, sharding and how its grad is reduced."""

    size: int  # global length n
    role: Role
    reparam: Reparam = "none"
    tp_sharded: bool = False  # sharded along dim 0 over the TP group (output-side vectors)
    grad_reduction: GradReduction = "none"  # for replicated vectors read by sharded consumers
    is_expert: bool = False  # lives in an expert: data-parallel reduction over expert-DP only
    direction_only: bool = False  # OR/ER without the magnitude (a following normalization removes it)


class ScaleVector(torch.nn.Module):
    """A learnable vector s in R^n; ``forward()`` returns the local part of s."""

    def __init__(
        self,
        spec: VectorSpec,
        tp_group: Optional[dist.ProcessGroup] = None,
        params_dtype: torch.dtype = torch.float32,
        expert_parallel: bool = False,
    ):
        super().__init__()
        if spec.tp_sharded and spec.grad_reduction != "none":
            raise ValueError("a TP-sharded vector owns its rows; it needs no TP grad reduction")
        self.spec = spec
        self.tp_group = tp_group
        tp = dist.get_world_size(tp_group) if (tp_group is not None and dist.is_initialized()) else 1
        if spec.tp_sharded and spec.size % tp != 0:
            raise ValueError(f"scale vector of size {spec.size} cannot be split over {tp} TP ranks")
        local = spec.size // tp if spec.tp_sharded else spec.size
        self.local_size = local
        if spec.reparam == "none":
            self.weight = torch.nn.Parameter(torch.ones(local, dtype=params_dtype))
        elif spec.reparam == "or":
            if not spec.direction_only:
                self.magnitude = torch.nn.Parameter(torch.ones(1, dtype=params_dtype))
            self.direction = torch.nn.Parameter(torch.ones(local, dtype=params_dtype))
        elif spec.reparam == "er":
            if not spec.direction_only:
                self.log_magnitude = torch.nn.Parameter(torch.zeros(1, dtype=params_dtype))
            self.log_direction = torch.nn.Parameter(torch.zeros(local, dtype=params_dtype))
        else:
            raise ValueError(f"unknown reparameterization {spec.reparam!r}")
        for name, p in self.named_parameters(recurse=False):
            p.sv_role = spec.role  # consumed by param_groups (IWD) and stats
            p.sv_part = name
            # DDP: expert vectors are reduced over the expert-data-parallel group like expert weights.
            p.allreduce = not (spec.is_expert and expert_parallel)
            # Shard-local params are TP-distinct; replicated ones are identical on all TP ranks.
            p.tensor_model_parallel = spec.tp_sharded and name in ("weight", "direction", "log_direction")
            if p.tensor_model_parallel:
                p.partition_dim = 0
                p.partition_stride = 1

    # -- the vector -------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        return self.value_from({})

    def value_from(self, params) -> torch.Tensor:
        """s computed from ``params`` ({parameter name: tensor}) in place of this module's own parameters
        (those not given are the module's). Used by the per-step fold with fp32 master values; a plain
        call, so no module hooks run (DDP's parameter-gather pre-hooks must not fire inside a step)."""
        spec = self.spec
        p = {**dict(self.named_parameters(recurse=False)), **params}
        if spec.reparam == "none":
            s = p["weight"]
        else:
            # in fp32 (one rounding at the end under bf16): the norm is a sum over n elements, TP-split
            if spec.reparam == "or":
                dtype, direction = p["direction"].dtype, p["direction"].float()
            else:
                dtype, direction = p["log_direction"].dtype, p["log_direction"].float().exp()
            sumsq = all_reduce_sum(direction.square().sum(), self.tp_group if spec.tp_sharded else None)
            s = direction * torch.rsqrt(sumsq / spec.size)
            if not spec.direction_only:
                scale = p["magnitude"].float() if spec.reparam == "or" else p["log_magnitude"].float().exp()
                if spec.tp_sharded:
                    # The magnitude is replicated but each rank only sees its rows' gradient.
                    scale = sum_grad_over_tp(scale, self.tp_group)
                s = scale * s
            s = s.to(dtype)
        if spec.grad_reduction == "tp_sum":
            s = sum_grad_over_tp(s, self.tp_group)
        return s

    @torch.no_grad()
    def magnitude_value(self) -> float:
        """The scalar magnitude (OR/ER) or the RMS of the vector (plain), for logging."""
        if self.spec.direction_only:
            return 1.0
        if self.spec.reparam == "or":
            return float(self.magnitude)
        if self.spec.reparam == "er":
            return float(self.log_magnitude.exp())
        sumsq = self.weight.square().sum()
        if self.spec.tp_sharded and self.tp_group is not None and dist.is_initialized():
            dist.all_reduce(sumsq, group=self.tp_group)
        return float((sumsq / self.spec.size).sqrt())

    @torch.no_grad()
    def set_value(self, full_vector: torch.Tensor) -> None:
        """Set s (global length n, or local shard when tp_sharded) exactly; used by conversion.

        OR: beta = rms(s), alpha = s / rms(s) (so |alpha| = sqrt(n)); ER needs s > 0. A direction-only
        vector keeps s / rms(s): its consumer's normalization removes the magnitude anyway.
        """
        v = full_vector.to(dtype=next(self.parameters()).dtype).flatten()
        if self.spec.tp_sharded and v.numel() == self.spec.size and self.local_size != self.spec.size:
            rank = dist.get_rank(self.tp_group)
            v = v[rank * self.local_size : (rank + 1) * self.local_size]
        if v.numel() != self.local_size:
            raise ValueError(f"vector of {v.numel()} values given for a scale vector of {self.local_size}")
        if self.spec.reparam == "none":
            self.weight.copy_(v)
            return
        sumsq = v.square().sum()
        if self.spec.tp_sharded and self.tp_group is not None and dist.is_initialized():
            dist.all_reduce(sumsq, group=self.tp_group)
        rms = (sumsq / self.spec.size).sqrt()
        if self.spec.reparam == "or":
            if not self.spec.direction_only:
                self.magnitude.fill_(rms)
            self.direction.copy_(v / rms)
        else:
            if bool((v <= 0).any()):
                raise ValueError("an ER scale vector can only represent positive values")
            if not self.spec.direction_only:
                self.log_magnitude.fill_(rms.log())
            self.log_direction.copy_((v / rms).log())

    # -- checkpointing ----------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        axis_map = {}
        if self.spec.tp_sharded:
            axis_map = {name: 0 for name in ("weight", "direction", "log_direction") if name in state}
        kwargs = {}
        if metadata is not None and "dp_cp_group" in metadata:
            kwargs["dp_cp_group"] = metadata["dp_cp_group"]
        return make_sharded_tensors_for_checkpoint(
            state, prefix, axis_map, sharded_offsets, tp_group=self.tp_group, **kwargs
        )

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"n={s.size}, local={self.local_size}, role={s.role}, reparam={s.reparam}, "
            f"tp_sharded={s.tp_sharded}, grad={s.grad_reduction}" + (", direction_only" if s.direction_only else "")
        )
