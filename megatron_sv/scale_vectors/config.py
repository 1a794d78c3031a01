"""The scale-vector method as a set of independent switches, and the paper's named presets.

Every named strategy of the paper (docs/method.md) is a preset of four switches (``ScaleVectorConfig``); users may start
from a preset and override single switches (``--sv-*`` flags). Validation happens here, before any model
is built, so a bad combination fails with a clear message instead of a shape error deep in a layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, get_args

from megatron_sv.config_fields import declared, fields_of

Placement = Literal["input", "dual", "dual_norm"]
Reparam = Literal["none", "or", "er"]
WeightDecayPolicy = Literal["megatron", "all", "none", "iwd"]
Role = Literal["input", "output"]

PLACEMENTS = get_args(Placement)
REPARAMS = get_args(Reparam)
WEIGHT_DECAY_POLICIES = get_args(WeightDecayPolicy)
ROLES = get_args(Role)


@dataclass(frozen=True)
class ScaleVectorConfig:
    """One switch per component of the method (docs/method.md, "Our precise definitions").

    learnable: False removes every learnable scale (strategy ``none``): norms compute N(h) only.
    branch_specific: HG. Each input-side branch (q, k, v, gate, up, router, every expert's gate/up) gets
        its own input-side vector instead of sharing the norm's gamma.
    placement: ``input`` (gamma before the linear map only), ``dual`` (DP: also an output-side u_b),
        ``dual_norm`` (DNP: u_b * N_b(W_b (gamma_b * N(h))) for q, k, gate, up; v and the router use DP).
    reparam: ``none`` (plain vector), ``or`` (beta * sqrt(n) * alpha/|alpha|), ``er`` (exp-space).
    weight_decay_policy: which scale vectors get weight decay (``iwd``: Input-Norm vectors only).
    final_norm_role: the final norm feeds the LM head, so it is an Input-Norm by our definition; one
        write-up calls it an Output-Norm, hence overridable.
    """

    learnable: bool = declared(
        True, derived=True, key="scale_vector_strategy", group="scale vectors", help="False: strategy none"
    )
    branch_specific: bool = declared(
        False,
        key="sv_branch_specific",
        group="scale vectors",
        switch=True,
        override=True,
        help="override the preset: one input-side vector per branch (HG) "
        "(default: as the preset of --scale-vector-strategy)",
    )
    placement: Placement = declared(
        "input",
        key="sv_placement",
        group="scale vectors",
        override=True,
        help="override the preset: input side only, dual (DP) or dual with normalization (DNP) "
        "(default: as the preset)",
    )
    reparam: Reparam = declared(
        "none",
        key="sv_reparam",
        group="scale vectors",
        override=True,
        help="override the preset: plain vectors, OR or ER magnitude-direction form (default: as the preset)",
    )
    weight_decay_policy: WeightDecayPolicy = declared(
        "megatron",
        key="sv_weight_decay_policy",
        group="scale vectors",
        override=True,
        applies=lambda a: a.scale_vector_strategy != "none",
        needs="learnable scale vectors (not --scale-vector-strategy none)",
        help="override the preset: which scale vectors get weight decay (default: as the preset)",
    )
    final_norm_role: Role = declared(
        "input",
        key="sv_final_norm_role",
        group="scale vectors",
        override=True,
        applies=lambda a: (a.sv_weight_decay_policy or _preset_policy(a.scale_vector_strategy)) == "iwd",
        needs="--sv-weight-decay-policy iwd (roles only choose weight decay)",
        help="override the final norm's role for weight decay (default: input, an Input-Norm)",
    )
    # Performance switch, not part of the method: fold W_eff once per optimizer step instead of once per
    # micro-batch (faster with several micro-batches; costs two weight-sized buffers per folded linear).
    fold_once_per_step: bool = declared(
        False,
        key="sv_fold_once_per_step",
        group="scale vectors",
        switch=True,
        not_defining="where the fold runs; the same function and gradients",
        help="fp32: cache every folded linear's W_eff once per optimizer step (one weight-sized "
        "fp32 buffer per folded linear during forward/backward) instead of letting the cost "
        "model choose per layer; under --bf16 weights are always folded once per step, at "
        "the optimizer's master->model copy, at no memory cost (docs/performance.md)",
    )

    def __post_init__(self):
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("reparam", self.reparam, REPARAMS)
        _check_choice("weight_decay_policy", self.weight_decay_policy, WEIGHT_DECAY_POLICIES)
        _check_choice("final_norm_role", self.final_norm_role, ROLES)
        if not self.learnable and (self.branch_specific or self.placement != "input" or self.reparam != "none"):
            raise ValueError(
                "scale vectors are disabled (learnable=False, strategy 'none'), so branch-specific "
                "vectors, dual placement and reparameterization cannot be enabled; pick another strategy"
            )

    @property
    def folds_into_weights(self) -> bool:
        """True when some vector lives in a linear map (branch vectors or output-side u_b)."""
        return self.learnable and (self.branch_specific or self.placement != "input")

    @property
    def has_inner_norms(self) -> bool:
        return self.learnable and self.placement == "dual_norm"

    @property
    def output_side(self) -> bool:
        return self.learnable and self.placement in ("dual", "dual_norm")

    def with_overrides(self, **overrides) -> "ScaleVectorConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown scale-vector switch(es): {sorted(unknown)}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **clean)

    def describe(self) -> str:
        if not self.learnable:
            return "no learnable scale vectors"
        parts = [
            "branch-specific" if self.branch_specific else "shared",
            f"placement={self.placement}",
            f"reparam={self.reparam}",
            f"wd={self.weight_decay_policy}",
        ]
        return ", ".join(parts)


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"scale-vector {name} must be one of {list(choices)}, got {value!r}")


# The paper's strategies (docs/method.md table). `standard` is the Megatron baseline.
STRATEGIES: dict[str, ScaleVectorConfig] = {
    "none": ScaleVectorConfig(learnable=False),
    "standard": ScaleVectorConfig(),
    "hg": ScaleVectorConfig(branch_specific=True),
    "dp": ScaleVectorConfig(branch_specific=True, placement="dual"),
    "dnp": ScaleVectorConfig(branch_specific=True, placement="dual_norm"),
    "or": ScaleVectorConfig(reparam="or"),
    "er": ScaleVectorConfig(reparam="er"),
    "iwd": ScaleVectorConfig(weight_decay_policy="iwd"),
    "unified": ScaleVectorConfig(branch_specific=True, placement="dual_norm", reparam="or", weight_decay_policy="iwd"),
}


def _preset_policy(strategy: str) -> str:
    preset = STRATEGIES.get(strategy)
    return preset.weight_decay_policy if preset is not None else ""


def strategy_config(name: str, **overrides: Optional[object]) -> ScaleVectorConfig:
    """The preset called ``name`` with single switches overridden (``None`` means keep the preset)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown --scale-vector-strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name].with_overrides(**overrides)


def config_from_saved(saved) -> ScaleVectorConfig:
    """The method that saved arguments (a checkpoint's, or the resolved flags) describe: the strategy's preset
    with the --sv-* overrides they hold."""
    overrides = {d.name: saved.get(d.key) for d in fields_of(ScaleVectorConfig) if not d.flag.derived}
    return strategy_config(saved.get("scale_vector_strategy", "standard"), **overrides)


def preset_overrides(saved) -> dict:
    """The --sv-* overrides (switch name -> value) that saved arguments hold, None left out."""
    return {
        d.name: saved.get(d.key)
        for d in fields_of(ScaleVectorConfig)
        if d.flag.override and saved.get(d.key) is not None
    }
