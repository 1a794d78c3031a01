"""Every parameter's reduced gradient gathered to its full, layout-independent shape (test helper).

Adam and gradient clipping are invariant to a gradient's scale, so equal losses cannot show a doubled or
missing reduction; the gradients themselves must be compared with the single-rank run. The model's own
``sharded_state_dict()`` says where each local tensor sits in the global one (TP shards, interleaved
q/k/v rows, SwiGLU's [gate | up] halves, experts over EP, layers over PP, with global keys), so the
gradient of each parameter is placed by the same map its checkpoint uses: a layout-invariant order.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megatron_sv.checkpointing.dist import _leaves  # one walker over sharded state dicts


def gather_reduced_grad_shards(ddp_model) -> None:
    """With the distributed optimizer each data-parallel rank holds only its reduced shard of every
    gradient bucket; all-gather the shards so main_grad is the full reduced gradient on every rank
    (the optimizer reads only its own shard, so the step is unaffected)."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in list(ddp_model.bucket_groups) + list(ddp_model.expert_parallel_bucket_groups):
        size = group.intra_distributed_optimizer_instance_size
        rank = group.intra_distributed_optimizer_instance_rank
        for bucket in group.buckets:
            local = shard_buffer(bucket.grad_data, size)[rank].clone()
            torch.distributed.all_gather_into_tensor(
                bucket.grad_data, local, group=group.intra_distributed_optimizer_instance_group
            )


def _local_pieces(module) -> List[Tuple[str, Tuple[int, ...], Tuple[int, ...], torch.Tensor]]:
    """(global key, global shape, global offset, local gradient) of every main-replica shard here."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    out = []

    def add(st, grad):
        if is_main_replica(st.replica_id):
            out.append((st.key, tuple(st.global_shape), tuple(st.global_offset), grad))

    for obj in _leaves(module.sharded_state_dict()):
        if not isinstance(getattr(obj, "data", None), torch.nn.Parameter):
            continue  # buffers, extra state
        grad = obj.data.main_grad.detach()
        if isinstance(obj, ShardedTensorFactory):  # e.g. SwiGLU's fc1: [gate | up] halves per TP rank
            for st in _leaves(obj.build_fn(obj.key, grad, obj.replica_id, obj.flattened_range)):
                add(st, st.data)
        elif isinstance(obj, ShardedTensor):
            add(obj, grad)
    return out


def full_gradients(module) -> Dict[str, torch.Tensor]:
    """Every parameter's main_grad, assembled to its global shape on every rank (collective over the
    whole world: all ranks must call it). Keys are the checkpoint's global keys."""
    pieces = _local_pieces(module)
    shapes = {key: shape for key, shape, _, _ in pieces}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, shapes)
    merged: Dict[str, Tuple[int, ...]] = {}
    for part in gathered:
        merged.update(part)
    keys = sorted(merged)
    sizes = [int(torch.Size(merged[k]).numel()) for k in keys]
    flat = torch.zeros(sum(sizes), dtype=torch.float32)
    views = dict(zip(keys, (v.view(merged[k]) for k, v in zip(keys, flat.split(sizes)))))
    for key, _, offset, grad in pieces:
        target = views[key]
        prepend = target.dim() - grad.dim()  # stacked axes (e.g. experts) precede the tensor's own
        index = tuple(slice(o, o + 1) for o in offset[:prepend]) + tuple(
            slice(o, o + n) for o, n in zip(offset[prepend:], grad.shape)
        )
        target[index] += grad.float().cpu().reshape(target[index].shape)
    torch.distributed.all_reduce(flat)  # each element was written by exactly one main replica
    return {k: views[k].clone() for k in keys}
