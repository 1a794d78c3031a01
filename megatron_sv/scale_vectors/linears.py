"""The local backend's linears that carry scale vectors, as drop-in Megatron-Core column/row-parallel linears.

``ScaledColumnParallelLinear`` is the input-side map of a norm (linear_qkv, linear_fc1, every expert's
linear_fc1): Megatron's ColumnParallelLinear with the branch scale vectors of ``branches.py`` (gamma_b,
u_b, DNP's inner norms, the fold). ``PostNormRowParallelLinear`` is a RowParallelLinear followed by a
post-sub-layer Output-Norm (``PostSublayerNorm``). The method's math lives in the mixins, which the FP8
(megatron_sv/fp8/layers.py) and Transformer Engine (te_modules.py) linears share; the classes here supply
only the local GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from .branches import BranchLayout, BranchScaleVectors
from .config import ScaleVectorConfig
from .norms import ScaledNorm


class ScaledColumnParallelLinear(BranchScaleVectors, ColumnParallelLinear):
    """ColumnParallelLinear + scale vectors for its branches (branches.py)."""

    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method,
        sv: ScaleVectorConfig,
        branch_layout: BranchLayout,
        **kwargs,
    ):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        self._init_branch_vectors(
            input_size=input_size,
            output_size=output_size,
            config=config,
            sv=sv,
            branch_layout=branch_layout,
            tp_group=self.tp_group,
            is_expert=self.is_expert,
            expert_parallel=self.is_expert and self.expert_parallel,
        )
        if self._folds():
            # The GEMM's weight is a folded tensor: fused wgrad accumulation into main_grad cannot apply
            # (step_fold switches it back on where the weight itself holds W_eff).
            self.gradient_accumulation_fusion = False

    def _gemm(self, input_, weight):
        return ColumnParallelLinear.forward(self, input_, weight=weight)

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        apply_inner_norm: bool = True,
    ):
        """Megatron's (output, bias); ``apply_inner_norm=False`` leaves DNP's inner norms to the caller
        (the MLP fuses gate/up's with SwiGLU)."""
        if weight is not None:
            raise ValueError("ScaledColumnParallelLinear folds its own weight; do not pass one")
        if runtime_gather_output:
            raise ValueError("ScaledColumnParallelLinear returns TP-local outputs")
        return self._branch_forward(input_, apply_inner_norm)


def make_post_norm(config, output_size: int, sv: ScaleVectorConfig, tp_group) -> ScaledNorm:
    """The Output-Norm after a row-parallel map (shared by the local and Transformer Engine backends)."""
    return ScaledNorm(
        config,
        output_size,
        config.layernorm_epsilon,
        sv=sv,
        has_scale=True,
        role="output",
        input_split="sequence",
        tp_group=tp_group,
    )


def apply_post_norm(post_norm: ScaledNorm, out: torch.Tensor, bias: Optional[torch.Tensor]):
    """Normalize the sub-layer's complete output (bias included); returns (output, None)."""
    if bias is not None:
        out = out + bias
    return post_norm(out), None


class PostSublayerNorm:
    """Mixin for a row-parallel linear: a post-sub-layer norm (Gemma / Peri-LN), an Output-Norm, on its output.

    The norm sees the hidden-complete output of the row-parallel reduction (sequence-sharded under SP,
    where its scale's gradient is partial and summed over TP). The backend class calls
    ``_init_post_norm`` at the end of its ``__init__``.
    """

    def _init_post_norm(self, config, output_size: int, sv: ScaleVectorConfig, tp_group) -> None:
        self.post_norm = make_post_norm(config, output_size, sv, tp_group)

    def forward(self, input_):
        return apply_post_norm(self.post_norm, *super().forward(input_))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        nested = f"{prefix}post_norm."
        out = {
            k: v
            for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
            if not k.startswith(nested)
        }
        out.update(self.post_norm.sharded_state_dict(nested, sharded_offsets, metadata))
        return out


class PostNormRowParallelLinear(PostSublayerNorm, RowParallelLinear):
    """RowParallelLinear followed by a post-sub-layer Output-Norm (``PostSublayerNorm``)."""

    def __init__(self, input_size, output_size, *, config, sv: ScaleVectorConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._init_post_norm(config, output_size, sv, self.tp_group)
