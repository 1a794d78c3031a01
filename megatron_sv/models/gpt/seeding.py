"""Layout-independent initialization: the same seed gives the same full weights at any TP/PP/EP layout.

With ``use_cpu_initialization`` Megatron draws each full weight from the CPU generator in construction
order and keeps this rank's slice. A pipeline stage that starts at layer k, or an expert-parallel rank
that builds experts 2 and 3, would otherwise draw from a different generator state than a single rank
does. Each layer is therefore seeded from (seed, global layer number) and each local expert's weights
are re-drawn from (seed, global layer, global expert index). Exact cross-layout equivalence tests and
paired-seed ablations rely on this. Scale vectors are constant-initialized and draw nothing.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

_LAYER_STRIDE = 1009
_EXPERT_STRIDE = 7919


def _layer_seed(init_seed: int, global_layer: int) -> int:
    return init_seed + _LAYER_STRIDE * global_layer


@torch.no_grad()
def _redraw_tp_sharded(
    weight: torch.Tensor, full_shape, partition_dim: int, stride: int, init_method, tp_rank: int, tp_size: int
) -> None:
    master = torch.empty(*full_shape, dtype=torch.float32)
    init_method(master)
    per_stride = weight.shape[partition_dim] // stride
    pieces = torch.split(master, per_stride, dim=partition_dim)[tp_rank::tp_size]
    weight.copy_(torch.cat(pieces, dim=partition_dim).to(weight.dtype))


def _redraw_experts(layer: TransformerLayer, init_seed: int, global_layer: int) -> None:
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    local = getattr(experts, "local_experts", None)
    if local is None:
        return
    ep_group = experts.ep_group
    first = ep_group.rank() * experts.num_local_experts
    cfg = layer.config
    for i, expert in enumerate(local):
        torch.manual_seed(_layer_seed(init_seed, global_layer) + _EXPERT_STRIDE * (first + i + 1))
        for lin, dim, init in (
            (expert.linear_fc1, 0, cfg.init_method),
            (expert.linear_fc2, 1, cfg.output_layer_init_method),
        ):
            tp_group = lin.tp_group
            tp_rank, tp_size = (tp_group.rank(), tp_group.size()) if tp_group is not None else (0, 1)
            full = list(lin.weight.shape)
            full[dim] *= tp_size
            stride = getattr(lin.weight, "partition_stride", 1) if dim == 0 else 1
            _redraw_tp_sharded(lin.weight, full, dim, stride, init, tp_rank, tp_size)


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer whose weights depend only on ``init_seed`` and its global position."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int = 0, **kwargs):
        offset = get_transformer_layer_offset(config, vp_stage=kwargs.get("vp_stage"))
        global_layer = layer_number + offset
        if config.perform_initialization:
            torch.manual_seed(_layer_seed(init_seed, global_layer))
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        if config.perform_initialization:
            _redraw_experts(self, init_seed, global_layer)
        # Leave the generator in a state that depends on the layer only (the LM head is drawn next).
        torch.manual_seed(_layer_seed(init_seed, global_layer) + 1)
