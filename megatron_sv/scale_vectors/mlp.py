"""Megatron's MLP with DNP's gate/up inner norm and SwiGLU fused into one op.

Megatron-Core's MLP runs linear_fc1 (whose DNP inner norms normalize gate and up and scale them by u) and
then SwiGLU as a separate step, so the activation is written by the norm and read again by SwiGLU. This
MLP takes fc1's output before the inner norm and applies ``inner_norms.norm_swiglu`` instead: read once,
written once. Every case the fused op does not cover runs Megatron's own forward unchanged: no inner norm,
a bias on fc1 (Megatron adds it after the norm), a GLU clamp or offset, a non-SiLU activation, TE's
activation modules, and per-token expert scaling.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from .branches import BranchScaleVectors
from .inner_norms import kernel_mode


def fuses_inner_norm_swiglu(mlp: MLP) -> bool:
    """Whether ``mlp``'s fc1 inner norm and SwiGLU can run as one op with the same result."""
    fc1, cfg = mlp.linear_fc1, mlp.config
    return (
        isinstance(fc1, BranchScaleVectors)
        and fc1.branch_layout == "gated_fc1"
        and fc1.inner_norm_branches == ("gate", "up")
        and fc1.bias is None
        and cfg.gated_linear_unit
        and cfg.activation_func is F.silu
        and not cfg.use_te_activation_func
        and cfg.activation_func_clamp_value is None
        and not cfg.glu_linear_offset
    )


class InnerNormSwiGLUMLP(MLP):
    """MLP whose activation step is DNP's fused gate/up norm + SwiGLU (see module docstring)."""

    def __init__(self, *args, pg_collection=None, is_mtp_layer: bool = False, **kwargs):
        # megatron-core >= 0.19 builds a layer's mlp with pg_collection and is_mtp_layer and translates them
        # for MLP itself only (MLP.as_mlp_submodule); this subclass does the same translation. 0.16.1 passes
        # neither.
        if pg_collection is not None and kwargs.get("tp_group") is None:
            kwargs["tp_group"] = pg_collection.tp
        super().__init__(*args, **kwargs)
        kernel_mode()  # a bad MEGATRON_SV_FUSED_KERNELS fails here, before any work
        self.fused = fuses_inner_norm_swiglu(self)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.fused or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        out, _ = self.linear_fc1(hidden_states, apply_inner_norm=False)  # bias is None (see fused)
        return self.linear_fc2(self.linear_fc1.inner_norm_swiglu(out))
