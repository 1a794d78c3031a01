"""The MoE router as an input-side branch: its own gamma_router under HG, and u_router under DP/DNP.

The router is replicated over TP; under sequence parallelism it reads a sequence shard, so its vectors'
gradients are summed over TP exactly when Megatron would all-reduce the router weight itself.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from .config import ScaleVectorConfig
from .folding import FoldLayout, fold_into_weight
from .vector import ScaleVector, VectorSpec


class ScaledTopKRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, *, sv: ScaleVectorConfig, **router_kwargs):
        # router_kwargs: what newer megatron-core passes on (0.19: is_mtp_layer), handed through unchanged
        super().__init__(config=config, pg_collection=pg_collection, **router_kwargs)
        self.sv = sv
        tp_group = self.tp_group if hasattr(self, "tp_group") else None
        tp = tp_group.size() if tp_group is not None else 1
        reduction = "tp_sum" if (config.sequence_parallel and tp > 1) else "none"
        common = dict(tp_group=tp_group, params_dtype=config.params_dtype)
        self.input_scale = None
        self.output_scale = None
        if sv.learnable and sv.branch_specific:
            self.input_scale = ScaleVector(
                VectorSpec(size=config.hidden_size, role="input", reparam=sv.reparam, grad_reduction=reduction),
                **common,
            )
        if sv.output_side:  # DNP keeps DP for the router (no inner norm on routing logits)
            self.output_scale = ScaleVector(
                VectorSpec(size=config.num_moe_experts, role="output", reparam=sv.reparam, grad_reduction=reduction),
                **common,
            )
        self._layout = FoldLayout(groups=1, slots=1, rows=config.num_moe_experts)

    def gating(self, input: torch.Tensor):
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        in_s = self.input_scale()[None, :] if self.input_scale is not None else None
        out_s = self.output_scale().view(1, 1, -1) if self.output_scale is not None else None
        weight = fold_into_weight(self.weight, self._layout, in_s, out_s)
        return router_gating_linear(input, weight, self.bias, router_dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        own = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if "." not in k}
        kwargs = {"dp_cp_group": metadata["dp_cp_group"]} if metadata and "dp_cp_group" in metadata else {}
        tp_group = getattr(self, "tp_group", None)
        out = make_sharded_tensors_for_checkpoint(own, prefix, {}, sharded_offsets, tp_group=tp_group, **kwargs)
        for name in ("input_scale", "output_scale"):
            vec = getattr(self, name)
            if vec is not None:
                out.update(vec.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return out
