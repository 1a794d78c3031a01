"""The scale-vector method's Transformer Engine (TE) modules: TE's GEMMs with the same mixins as the local ones.

Import only where TE is usable (models/gpt/backends.py checks first): the classes subclass
megatron-core's TE wrappers, which are placeholders without TE. Each class is TE's module plus
  * ``BranchScaleVectors`` (branches.py): the branch scale vectors, fold and DNP inner norms, exactly as
    on the local backend; TE's GEMM runs on W_eff, which is what TE quantizes to FP8;
  * ``PostSublayerNorm`` (linears.py): a post-sub-layer Output-Norm after the row-parallel GEMM;
  * ``LocalSchema``: checkpoints in the local key schema (te_linears.py), so they move between backends.
What is TE's own: how its GEMM is handed a weight (``gemm_weight``), its TP-group attribute and its fused
wgrad-accumulation switch.
"""

from __future__ import annotations

import torch
from megatron.core.extensions import transformer_engine as mte
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from .branches import BranchScaleVectors
from .linears import PostSublayerNorm
from .te_linears import gemm_weight, install_schema_hooks, sharded_in_local_schema


class LocalSchema:
    """Mixin (first in the bases): load hooks and sharded checkpoint keys in the local schema."""

    fused_norm = False  # a fused norm's parameters are saved under the local norm's keys

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_schema_hooks(self, fused_norm=self.fused_norm)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return sharded_in_local_schema(super().sharded_state_dict(prefix, sharded_offsets, metadata))


class SVTELayerNormColumnParallelLinear(LocalSchema, mte.TELayerNormColumnParallelLinear):
    """``standard``: TE's fused norm + GEMM; the norm's gamma is the layer's Input-Norm vector."""

    fused_norm = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The fused norm's gamma is the pre-norm's scale vector (IWD roles, statistics).
        self.layer_norm_weight.sv_role, self.layer_norm_weight.sv_part = "input", "weight"


class SVTEColumnParallelLinear(LocalSchema, BranchScaleVectors, mte.TEColumnParallelLinear):
    """TE GEMM on W_eff = diag(u) W diag(gamma_b); DNP inner norms after the GEMM (branches.py)."""

    def __init__(self, input_size, output_size, *, config, init_method, sv, branch_layout, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        is_expert = kwargs.get("is_expert", False)
        self._init_branch_vectors(
            input_size=input_size,
            output_size=output_size,
            config=config,
            sv=sv,
            branch_layout=branch_layout,
            tp_group=self._tp_group,
            is_expert=is_expert,
            expert_parallel=is_expert and config.expert_model_parallel_size > 1,
        )
        if self._folds():
            # TE's GEMM sees a folded tensor, not the parameter: no fused main_grad accumulation.
            self.fuse_wgrad_accumulation = False

    def _gemm(self, input_, weight):
        if weight is None or weight is self.weight:
            return mte.TEColumnParallelLinear.forward(self, input_)
        with gemm_weight(self, weight):
            return mte.TEColumnParallelLinear.forward(self, input_)

    def forward(self, x: torch.Tensor, apply_inner_norm: bool = True):
        return self._branch_forward(x, apply_inner_norm)


class SVTERowParallelLinear(LocalSchema, mte.TERowParallelLinear):
    """TE row-parallel GEMM, saved in the local schema."""


class SVTEPostNormRowParallelLinear(PostSublayerNorm, SVTERowParallelLinear):
    """TE row-parallel GEMM + a post-sub-layer Output-Norm (our norm, as on the local backend)."""

    def __init__(self, input_size, output_size, *, config, sv, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._init_post_norm(config, output_size, sv, self._tp_group)


class SVTEDotProductAttention(LocalSchema, mte.TEDotProductAttention):
    """TE fused attention; its FP8 metadata is not part of the local schema."""
