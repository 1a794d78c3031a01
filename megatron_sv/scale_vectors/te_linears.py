"""Transformer Engine (TE) versions of the scale-vector linears, for FP8 GEMMs on Hopper-class GPUs.

TE is imported lazily: importing this module never touches it, and asking for a TE class on a machine
without TE (or without CUDA) raises ``TransformerEngineUnavailable`` with a plain message. The local
backend (``linears.py``) is unaffected.

Two ways a norm meets its input-side map on TE:
  * ``standard`` (one shared plain gamma, nothing to fold): ``SVTELayerNormColumnParallelLinear``, TE's
    fused norm + GEMM. The norm writes the FP8 input of the FP8 GEMM directly.
  * every other strategy: our ``ScaledNorm`` (with or without scale) followed by
    ``SVTEColumnParallelLinear``, which folds gamma_b / u_b into the weight with the same code as the
    local backend (``folding.fold_into_weight`` via the borrowed ``ScaledColumnParallelLinear`` methods)
    and hands TE the folded weight W_eff: W_eff is what TE quantizes to FP8. DNP's inner norms (and
    QK-norm) are our norms: they reduce their own gradients inside autograd, while TE's norms rely on
    Megatron's name-keyed reduction, which our configs switch off.

Checkpoint keys: TE modules save in the local schema, so a checkpoint moves between backends unchanged:
  * TE's fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (and ``_bias``)
    are saved as the local ``input_layernorm.scale.weight`` / ``pre_mlp_layernorm.scale.weight``
    (``.bias``); see ``te_key_to_local`` / ``local_key_to_te``.
  * ``_extra_state`` of the linears keeps its name: Megatron's local linears write the same keys (value
    None), TE writes its FP8 scaling metadata there, and TE reads a None as "no state" (a local
    checkpoint starts TE's delayed-scaling amax history afresh; ``tensorwise`` scaling has none).
  * TE attention's ``core_attention._extra_state`` has no local counterpart: not saved, and tolerated
    as missing on load (FP8 attention metadata only; TE itself tolerates it missing).
Both ``sharded_state_dict`` (dist checkpointing) and ``state_dict`` / ``load_state_dict`` follow this.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from .folding import FoldLayout, recompute_saved_weight

TE_INSTALL_HINT = (
    "--transformer-impl transformer_engine needs NVIDIA Transformer Engine on a CUDA "
    "machine (pip install --no-build-isolation transformer_engine[pytorch]); "
    "use --transformer-impl local otherwise"
)


class TransformerEngineUnavailable(ImportError):
    """Raised when the TE backend is requested where Transformer Engine cannot run."""


def transformer_engine_status() -> Tuple[bool, str]:
    """(usable, reason). Usable means ``import transformer_engine.pytorch`` works and CUDA is present."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising OSError/RuntimeError
        return False, f"Transformer Engine cannot be imported ({type(exc).__name__}: {exc})"
    return True, "ok"


def require_transformer_engine() -> None:
    ok, reason = transformer_engine_status()
    if not ok:
        raise TransformerEngineUnavailable(f"{TE_INSTALL_HINT}: {reason}")


# -- pure helpers shared with the local backend's layout --------------------------------------------
@dataclass(frozen=True)
class BranchPlan:
    """How a fused column-parallel weight splits into branches on this TP rank."""

    layout: FoldLayout
    slot_branch: Tuple[str, ...]
    branch_rows: Dict[str, int]  # global rows per branch (a vector's global length)
    inner_norm_candidates: Tuple[str, ...]  # branches that get DNP's inner norm N_b


def branch_plan(
    branch_layout: str,
    *,
    output_size: int,
    tp_size: int,
    num_attention_heads: int,
    num_query_groups: Optional[int],
    kv_channels: int,
) -> BranchPlan:
    """The same row layout as ``ScaledColumnParallelLinear`` (tested to agree)."""
    if output_size % tp_size:
        raise ValueError(f"{output_size} rows cannot be split over {tp_size} TP ranks")
    rows_local = output_size // tp_size
    if branch_layout == "qkv":
        ng, nh, hn = num_query_groups or num_attention_heads, num_attention_heads, kv_channels
        if ng % tp_size != 0:
            raise ValueError(
                f"scale vectors on linear_qkv need num_query_groups ({ng}) divisible by the "
                f"tensor-parallel size ({tp_size})"
            )
        qpg = nh // ng
        layout = FoldLayout(groups=ng // tp_size, slots=qpg + 2, rows=hn)
        plan = BranchPlan(
            layout, tuple(["q"] * qpg + ["k", "v"]), {"q": nh * hn, "k": ng * hn, "v": ng * hn}, ("q", "k")
        )
    elif branch_layout == "gated_fc1":
        plan = BranchPlan(
            FoldLayout(groups=1, slots=2, rows=rows_local // 2),
            ("gate", "up"),
            {"gate": output_size // 2, "up": output_size // 2},
            ("gate", "up"),
        )
    elif branch_layout == "fc1":
        plan = BranchPlan(FoldLayout(groups=1, slots=1, rows=rows_local), ("fc1",), {"fc1": output_size}, ("fc1",))
    else:
        raise ValueError(f"unknown branch layout {branch_layout!r}")
    if plan.layout.out_features != rows_local:
        raise ValueError(f"{branch_layout} layout {plan.layout} does not match {rows_local} local rows")
    return plan


def fuses_norm_into_linear(sv) -> bool:
    """True when TE's fused norm+GEMM can hold the strategy's pre-norm exactly (one plain shared gamma)."""
    return sv.learnable and not sv.folds_into_weights and sv.reparam == "none"


# -- checkpoint key schema ----------------------------------------------------------------------------
# (TE module path, local norm path) of the norms that TE fuses into the following GEMM.
FUSED_NORM_SITES = (("self_attention.linear_qkv", "input_layernorm"), ("mlp.linear_fc1", "pre_mlp_layernorm"))
# TE parameter name -> local parameter name inside the norm.
FUSED_NORM_PARAMS = (("layer_norm_weight", "scale.weight"), ("layer_norm_bias", "bias"))
EXTRA_STATE = "_extra_state"

_TE_TO_LOCAL = [
    (re.compile(rf"^(.*?)(?<![^.]){re.escape(te_mod)}\.{te_p}$"), f"{loc_mod}.{loc_p}")
    for te_mod, loc_mod in FUSED_NORM_SITES
    for te_p, loc_p in FUSED_NORM_PARAMS
]
_LOCAL_TO_TE = [
    (re.compile(rf"^(.*?)(?<![^.]){re.escape(loc_mod)}\.{re.escape(loc_p)}$"), f"{te_mod}.{te_p}")
    for te_mod, loc_mod in FUSED_NORM_SITES
    for te_p, loc_p in FUSED_NORM_PARAMS
]


_TE_ONLY_STATE = re.compile(rf"(^|.*\.)core_attention\.(.*\.)?{EXTRA_STATE}$")


def is_te_only_state(key: str) -> bool:
    """TE attention's FP8 metadata: the local core attention has no state to match it."""
    return _TE_ONLY_STATE.match(key) is not None


def te_key_to_local(key: str) -> Optional[str]:
    """The local-schema key of a TE model's state-dict key; None for TE-only state."""
    if is_te_only_state(key):
        return None
    for pattern, local in _TE_TO_LOCAL:
        m = pattern.match(key)
        if m:
            return m.group(1) + local
    return key


def local_key_to_te(key: str, fused_norms: bool) -> str:
    """The TE model's key for a local-schema key (norm keys move only where TE fuses the norm)."""
    if fused_norms:
        for pattern, te in _LOCAL_TO_TE:
            m = pattern.match(key)
            if m:
                return m.group(1) + te
    return key


def te_state_dict_to_local(state_dict: Mapping[str, object]) -> Dict[str, object]:
    out = {}
    for k, v in state_dict.items():
        new = te_key_to_local(k)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"two TE keys map to the local key {new!r}")
        out[new] = v
    return out


def local_state_dict_to_te(state_dict: Mapping[str, object], fused_norms: bool) -> Dict[str, object]:
    out = {}
    for k, v in state_dict.items():
        new = local_key_to_te(k, fused_norms)
        if new in out:
            raise ValueError(f"two local keys map to the TE key {new!r}")
        out[new] = v
    return out


# State-dict hooks of the TE modules (pure functions of the dicts; registered in the modules below).
def save_in_local_schema(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: rename this module's keys to the local schema, drop TE-only state."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = te_key_to_local(key)
        if new is None:
            del state_dict[key]
        elif new != key:
            state_dict[new] = state_dict.pop(key)


def load_from_local_schema(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """load_state_dict pre-hook: fetch this module's fused-norm params from their local keys.

    The local norm keys belong to a sibling module slot (``input_layernorm``, an IdentityOp on TE) that
    strict loading has already flagged as unexpected; they are taken back from that list here.
    """
    for te_name, _ in FUSED_NORM_PARAMS:
        te_key = prefix + te_name
        local = te_key_to_local(te_key)
        if local != te_key and local in state_dict and te_key not in state_dict:
            state_dict[te_key] = state_dict.pop(local)
            if local in unexpected_keys:
                unexpected_keys.remove(local)


def tolerate_missing_te_only_state(module, incompatible_keys) -> None:
    """load_state_dict post-hook: a local-schema state dict has no TE-only state."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not is_te_only_state(k)]


def sharded_in_local_schema(sharded: dict) -> dict:
    """Rename the checkpoint keys (``.key``, not the dict keys: those must stay the module's own names
    for ``load_state_dict``) of a TE module's sharded state dict to the local schema; drop TE-only state."""
    import dataclasses

    out = {}
    for name, sh in sharded.items():
        if is_te_only_state(name):
            continue
        ckpt_key = getattr(sh, "key", None)
        if ckpt_key is not None:
            local = te_key_to_local(ckpt_key)
            if local is not None and local != ckpt_key:
                sh = dataclasses.replace(sh, key=local)
        out[name] = sh
    return out


def _install_schema_hooks(module: torch.nn.Module, fused_norm: bool) -> None:
    module.register_state_dict_post_hook(save_in_local_schema)
    module.register_load_state_dict_post_hook(tolerate_missing_te_only_state)
    if fused_norm:
        module.register_load_state_dict_pre_hook(load_from_local_schema)


@contextlib.contextmanager
def gemm_weight(module: torch.nn.Module, tensor: torch.Tensor, name: str = "weight"):
    """Let TE's forward read ``tensor`` where it reads its weight parameter (TE reads weights with
    ``getattr(self, name)`` in every version); the parameter itself is restored on exit."""
    params = module._parameters
    original = params[name]
    params[name] = tensor
    try:
        yield
    finally:
        params[name] = original


def _metadata_with_dp_cp(metadata):
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return ensure_metadata_has_dp_cp_group(metadata)


# -- the TE module classes (built on first use, after TE is known to be usable) -----------------------
@functools.lru_cache(maxsize=None)
def te_classes():
    """The TE module classes of the scale-vector method; raises TransformerEngineUnavailable without TE."""
    require_transformer_engine()
    from types import SimpleNamespace

    from megatron.core.extensions import transformer_engine as mte

    from .linears import ScaledColumnParallelLinear, apply_post_norm, make_post_norm
    from .vector import ScaleVector, VectorSpec

    class SVTELayerNormColumnParallelLinear(mte.TELayerNormColumnParallelLinear):
        """``standard``: TE's fused norm + GEMM; the norm's gamma is the layer's Input-Norm vector."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The fused norm's gamma is the pre-norm's scale vector (IWD roles, statistics).
            self.layer_norm_weight.sv_role, self.layer_norm_weight.sv_part = "input", "weight"
            _install_schema_hooks(self, fused_norm=True)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, _metadata_with_dp_cp(metadata))
            return sharded_in_local_schema(sd)

    class SVTEColumnParallelLinear(mte.TEColumnParallelLinear):
        """TE GEMM on W_eff = diag(u) W diag(gamma_b); DNP inner norms after the GEMM (our norms)."""

        # One home for the method: the local layer's folding and inner-norm code, used as is.
        _slot_input_scales = ScaledColumnParallelLinear._slot_input_scales
        _folded_output_scales = ScaledColumnParallelLinear._folded_output_scales
        folded_weight = ScaledColumnParallelLinear.folded_weight
        _inner_norm_and_scale = ScaledColumnParallelLinear._inner_norm_and_scale
        _refold = ScaledColumnParallelLinear._refold

        def __init__(self, input_size, output_size, *, config, init_method, sv, branch_layout, **kwargs):
            super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
            from megatron.core.utils import get_pg_size

            self.sv = sv
            self.branch_layout = branch_layout
            self.tp_size = get_pg_size(self._tp_group)
            plan = branch_plan(
                branch_layout,
                output_size=output_size,
                tp_size=self.tp_size,
                num_attention_heads=config.num_attention_heads,
                num_query_groups=config.num_query_groups,
                kv_channels=config.kv_channels,
            )
            self.layout = plan.layout
            self.slot_branch = list(plan.slot_branch)
            self.branches = list(dict.fromkeys(self.slot_branch))
            self.inner_norm_branches = plan.inner_norm_candidates if sv.has_inner_norms else ()
            self.norm_kind = getattr(config, "normalization", "RMSNorm")
            self.norm_eps = config.layernorm_epsilon
            is_expert = kwargs.get("is_expert", False)
            common = dict(
                tp_group=self._tp_group,
                params_dtype=config.params_dtype,
                expert_parallel=is_expert and config.expert_model_parallel_size > 1,
            )
            self.input_scales = torch.nn.ModuleDict()
            if sv.learnable and sv.branch_specific:
                for b in self.branches:
                    self.input_scales[b] = ScaleVector(
                        VectorSpec(  # no magnitude before an inner norm
                            size=input_size,
                            role="input",
                            reparam=sv.reparam,
                            grad_reduction="tp_sum",
                            is_expert=is_expert,
                            direction_only=b in self.inner_norm_branches,
                        ),
                        **common,
                    )
            self.output_scales = torch.nn.ModuleDict()
            if sv.output_side:
                for b in self.branches:
                    self.output_scales[b] = ScaleVector(
                        VectorSpec(
                            size=plan.branch_rows[b],
                            role="output",
                            reparam=sv.reparam,
                            tp_sharded=True,
                            is_expert=is_expert,
                        ),
                        **common,
                    )
            if self.input_scales or self.output_scales:
                # TE's GEMM sees a folded tensor, not the parameter: no fused main_grad accumulation.
                self.fuse_wgrad_accumulation = False
            # Vectors live where TE put the weight (CPU under use_cpu_initialization, else the GPU).
            self.input_scales.to(self.weight.device)
            self.output_scales.to(self.weight.device)
            _install_schema_hooks(self, fused_norm=False)

        def forward(self, x):
            w_eff = self.folded_weight()
            if w_eff is self.weight:
                out, bias = super().forward(x)
            else:
                w_eff = w_eff.contiguous()
                with recompute_saved_weight(w_eff, self._refold), gemm_weight(self, w_eff):
                    out, bias = super().forward(x)
            if self.inner_norm_branches:
                out = self._inner_norm_and_scale(out)
            return out, bias

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            metadata = _metadata_with_dp_cp(metadata)
            out = sharded_in_local_schema(super().sharded_state_dict(prefix, sharded_offsets, metadata))
            for group_name in ("input_scales", "output_scales"):
                for b, vec in getattr(self, group_name).items():
                    out.update(vec.sharded_state_dict(f"{prefix}{group_name}.{b}.", sharded_offsets, metadata))
            return out

    class _LocalSchema:
        """Mixin for TE modules without a fused norm: load hooks and sharded keys in the local schema."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _install_schema_hooks(self, fused_norm=False)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, _metadata_with_dp_cp(metadata))
            return sharded_in_local_schema(sd)

    class SVTERowParallelLinear(_LocalSchema, mte.TERowParallelLinear):
        """TE row-parallel GEMM, saved in the local schema."""

    class SVTEPostNormRowParallelLinear(SVTERowParallelLinear):
        """TE row-parallel GEMM + a post-sub-layer Output-Norm (our norm, as in the local backend)."""

        def __init__(self, input_size, output_size, *, config, sv, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_norm = make_post_norm(config, output_size, sv, self._tp_group)

        def forward(self, x):
            return apply_post_norm(self.post_norm, *super().forward(x))

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            out.update(self.post_norm.sharded_state_dict(f"{prefix}post_norm.", sharded_offsets, metadata))
            return out

    class SVTEDotProductAttention(_LocalSchema, mte.TEDotProductAttention):
        """TE fused attention; its FP8 metadata is not part of the local schema."""

    return SimpleNamespace(
        SVTELayerNormColumnParallelLinear=SVTELayerNormColumnParallelLinear,
        SVTEColumnParallelLinear=SVTEColumnParallelLinear,
        SVTERowParallelLinear=SVTERowParallelLinear,
        SVTEPostNormRowParallelLinear=SVTEPostNormRowParallelLinear,
        SVTEDotProductAttention=SVTEDotProductAttention,
    )
