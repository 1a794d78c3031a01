"""Backends: the module classes that fill the slots of the one layer spec (sv_layer_specs.py).

As in Megatron-Core's ``BackendSpecProvider`` (megatron/core/models/backends.py), the spec body decides
which module goes where and which scale vectors it carries; a backend only supplies the classes. Ours:

  backend               column linear with vectors        row linear (+ post-norm)       core attention
  local                 ScaledColumnParallelLinear        RowParallelLinear              SDPA (or given)
  fp8 (local, FP8 GEMM) FP8ScaledColumnParallelLinear     FP8RowParallelLinear           SDPA (or given)
  transformer_engine    SVTEColumnParallelLinear          SVTERowParallelLinear          TE DotProductAttention

Every column linear with vectors is the same ``BranchScaleVectors`` mixin (scale_vectors/branches.py) on a
different GEMM, and every post-norm row linear the same ``PostSublayerNorm`` mixin, so the method's math
(which vectors, where, their roles and reductions, the fold) exists once. Adding a backend means writing
its GEMM classes with those mixins and a function here that returns a ``Backend``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from megatron.core.tensor_parallel.layers import RowParallelLinear

from megatron_sv.fp8.layers import FP8PostNormRowParallelLinear, FP8RowParallelLinear, FP8ScaledColumnParallelLinear
from megatron_sv.fp8.recipe import FP8Recipe
from megatron_sv.platform.attention import SDPACoreAttention
from megatron_sv.scale_vectors.linears import PostNormRowParallelLinear, ScaledColumnParallelLinear
from megatron_sv.scale_vectors.te_linears import require_transformer_engine

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def check_transformer_impl(impl: str) -> str:
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {list(TRANSFORMER_IMPLS)}, got {impl!r}")
    return impl


@dataclass(frozen=True)
class Backend:
    """The module classes one backend supplies to the layer spec."""

    name: str
    scaled_column_linear: type  # input-side map of a norm: branch vectors, fold, DNP inner norms
    row_linear: type
    post_norm_row_linear: type  # row linear + post-sub-layer Output-Norm
    core_attention: type
    # one module for a norm and its input-side GEMM, used where the norm has one plain shared gamma
    # (te_linears.fuses_norm_into_linear); None: the norm is its own module
    fused_norm_column_linear: Optional[type] = None
    linear_params: Mapping[str, object] = field(default_factory=dict)  # extra params of every linear (FP8 recipe)
    supports_moe: bool = True
    takes_core_attention: bool = True  # LayerOptions.core_attention may replace core_attention


LOCAL = Backend(
    name="local",
    scaled_column_linear=ScaledColumnParallelLinear,
    row_linear=RowParallelLinear,
    post_norm_row_linear=PostNormRowParallelLinear,
    core_attention=SDPACoreAttention,
)


def fp8_backend(recipe: FP8Recipe) -> Backend:
    """The local backend with every column/row-parallel linear's GEMMs in FP8 (torch._scaled_mm)."""
    return Backend(
        name="fp8",
        scaled_column_linear=FP8ScaledColumnParallelLinear,
        row_linear=FP8RowParallelLinear,
        post_norm_row_linear=FP8PostNormRowParallelLinear,
        core_attention=SDPACoreAttention,
        linear_params={"fp8": recipe},
    )


def transformer_engine_backend() -> Backend:
    """TE's GEMMs and attention; raises TransformerEngineUnavailable where TE cannot run."""
    require_transformer_engine()
    from megatron_sv.scale_vectors import te_modules as te  # noqa: PLC0415 - subclasses TE's modules: after the check

    return Backend(
        name="transformer_engine",
        scaled_column_linear=te.SVTEColumnParallelLinear,
        row_linear=te.SVTERowParallelLinear,
        post_norm_row_linear=te.SVTEPostNormRowParallelLinear,
        core_attention=te.SVTEDotProductAttention,
        fused_norm_column_linear=te.SVTELayerNormColumnParallelLinear,
        supports_moe=False,
        takes_core_attention=False,
    )


def backend_for(transformer_impl: str, fp8: Optional[FP8Recipe]) -> Backend:
    """The backend of ``--transformer-impl`` (and, on the local one, ``--fp8-format``'s recipe)."""
    check_transformer_impl(transformer_impl)
    if transformer_impl == "transformer_engine":
        if fp8 is not None:
            raise ValueError(
                "LayerOptions.fp8 is the local backend's FP8; Transformer Engine takes its FP8 "
                "recipe from TransformerConfig.fp8"
            )
        return transformer_engine_backend()
    return LOCAL if fp8 is None else fp8_backend(fp8)
