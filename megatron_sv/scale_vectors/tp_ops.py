"""Autograd-aware reductions across a tensor-parallel group, used by the scale-vector layers.

Megatron's ``finalize_model_grads`` reduces replicated parameters only when they carry the
``sequence_parallel`` attribute or a q/k_layernorm name (Megatron-LM issues 1446, 1528, 7452). Our
vectors do not rely on that: each vector states how its gradient is reduced and the reduction happens
inside autograd, so the rule holds at any TP/SP layout without name matching.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def sum_grad_over_tp(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient in backward.

    For a replicated vector whose consumers are sharded (by output rows, heads or sequence): each rank
    only sees its share of dL/dvector, and the sum is the true gradient.
    """
    if _group_size(group) == 1:
        return tensor
    return copy_to_tensor_model_parallel_region(tensor, group=group)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All-reduce (sum) forward and backward: a global statistic computed from sharded pieces.

    Every rank uses the global sum for its own shard, so the gradient of each piece is the sum of all
    ranks' gradients of the total.
    """
    if _group_size(group) == 1:
        return tensor
    return copy_to_tensor_model_parallel_region(
        reduce_from_tensor_model_parallel_region(tensor, group=group), group=group
    )
