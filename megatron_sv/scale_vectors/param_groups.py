"""Weight decay by norm role (IWD) as Megatron-Core optimizer param-group overrides.

Roles (docs/method.md): an Input-Norm vector feeds a linear map (pre-norm gamma, HG/DP/DNP input-side gamma_b,
the final norm's gamma); an Output-Norm vector sets a sub-module's output scale (output-side u_b,
QK-norm, post-sub-layer norms). A reparameterized vector's magnitude and direction inherit its role.
Every scale-vector parameter carries ``sv_role`` (set by ``ScaleVector``), so nothing here matches names.

Policies for scale-vector parameters:
  megatron  Megatron's default rule: no decay on any 1-D parameter (the well-tuned baseline)
  all       decay every scale vector
  none      decay no scale vector (stated by role; coincides with ``megatron`` since all vectors are 1-D)
  iwd       decay Input-Norm vectors only
Other parameters always follow Megatron's rule (matrices decayed; biases and 1-D params not).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Tuple

import torch
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from .config import ScaleVectorConfig


def is_scale_vector_param(param: torch.Tensor) -> bool:
    return getattr(param, "sv_role", None) is not None


def decays(sv: ScaleVectorConfig, param: torch.Tensor, name: str) -> bool:
    """Whether weight decay applies to ``param`` under the strategy's policy."""
    role = getattr(param, "sv_role", None)
    if role is None:
        return not (param.dim() == 1 or name.endswith(".bias"))
    policy = sv.weight_decay_policy
    if policy == "all":
        return True
    if policy == "iwd":
        return role == "input"
    return False  # megatron, none


def scale_vector_config_overrides(sv: ScaleVectorConfig) -> Dict[ParamKey, ParamGroupOverride]:
    """``config_overrides`` for ``megatron.core.optimizer.get_megatron_optimizer``."""
    policy = sv.weight_decay_policy
    overrides: Dict[ParamKey, ParamGroupOverride] = OrderedDict()
    # Megatron's rule for everything that is not a scale vector (biases, other 1-D params, LN shifts).
    overrides[
        ParamKey(
            name="*.bias",
            predicate=ParamPredicate(name="sv_other_1d", fn=lambda p: p.dim() == 1 and not is_scale_vector_param(p)),
        )
    ] = ParamGroupOverride(wd_mult=0.0)
    # Scale vectors that are not decayed under the policy.
    no_decay_roles = {"megatron": ("input", "output"), "none": ("input", "output"), "all": (), "iwd": ("output",)}[
        policy
    ]
    for role in no_decay_roles:
        overrides[
            ParamKey(
                predicate=ParamPredicate(name=f"sv_{role}_no_wd", fn=lambda p, r=role: getattr(p, "sv_role", None) == r)
            )
        ] = ParamGroupOverride(wd_mult=0.0)
    return overrides


def _group_label(param: torch.Tensor, name: str) -> str:
    role = getattr(param, "sv_role", None)
    if role is not None:
        return f"scale vectors ({'Input' if role == 'input' else 'Output'}-Norm)"
    if name.endswith(".bias") or param.dim() == 1:
        return "biases / other 1-D"
    return "weights"


def param_group_table(
    sv: ScaleVectorConfig, model_chunks: Iterable[torch.nn.Module], weight_decay: float, lr_mult: float = 1.0
) -> List[Tuple[str, int, int, float, float]]:
    """Rows (group, tensors, elements, weight decay, LR multiplier) of this rank's parameters."""
    rows: Dict[Tuple[str, float], List[int]] = OrderedDict()
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            wd = weight_decay if decays(sv, p, name) else 0.0
            key = (_group_label(p, name), wd)
            entry = rows.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += p.numel()
    return [(label, n, numel, wd, lr_mult) for (label, wd), (n, numel) in rows.items()]


def format_param_group_table(rows) -> str:
    header = f"{'param group':<32} {'tensors':>8} {'elements':>12} {'weight decay':>13} {'lr mult':>8}"
    lines = [header, "-" * len(header)]
    for label, n, numel, wd, lr_mult in rows:
        lines.append(f"{label:<32} {n:>8} {numel:>12,} {wd:>13g} {lr_mult:>8g}")
    return "\n".join(lines)
