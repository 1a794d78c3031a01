"""A layout- and strategy-neutral view of one transformer layer, and the rules that move scale vectors
between norms, branch vectors and weights.

Every input-side map is a *branch* b (q, k, v; gate, up; router; every expert's gate/up; the LM head):
``y_b = u_b * [N_b](W_b (e_b * N(h)))`` where e_b = gamma (the norm's shared scale) * gamma_b (the branch's
own input vector), u_b the output-side vector and N_b an optional inner norm (DNP). A ``NormGroup`` is a
pre-norm with the branches that read it.

``resolve_group`` rewrites a group for a target placement of vectors. Exact rules (all function-preserving):
  * an input-side scale can always be folded into its branch's weight columns: W diag(e);
  * a shared norm scale exists in the target only if every branch reads the same e_b; otherwise it is set
    to 1 and the e_b are folded;
  * an output-side u_b without an inner norm can be folded into the weight rows: diag(u) W;
  * ER can only represent positive vectors: a negative entry's sign moves into the weight (columns for
    input-side, rows for output-side vectors; RMS inner norms are sign-equivariant); a zero is refused.
Not function-preserving (recorded as a reason; the caller refuses unless explicitly allowed): adding or
removing an inner norm N_b, or dropping a learnable Output-Norm scale (QK-norm, post-norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch


class ConversionError(ValueError):
    """A conversion that cannot be done (or not without changing the model's function)."""


@dataclass
class Branch:
    weight: torch.Tensor  # [rows, in]
    in_scale: Optional[torch.Tensor] = None  # branch-specific input-side vector [in] (None: 1)
    out_scale: Optional[torch.Tensor] = None  # output-side vector [rows] (None: 1)
    inner_norm: bool = False  # u is applied after an inner norm N_b (DNP), so it is not foldable


@dataclass
class NormGroup:
    gamma: Optional[torch.Tensor]  # the norm's own scale (None: no scale, i.e. 1)
    branches: Dict[str, Branch]
    frozen: Tuple[str, ...] = ()  # branches whose weight must not change (a tied LM head)


@dataclass(frozen=True)
class GroupTarget:
    shared_scale: bool  # the norm keeps a scale vector
    branch_scales: bool  # every branch has its own input-side vector (HG)
    output_scales: Tuple[str, ...] = ()  # branches with an output-side vector
    inner: Tuple[str, ...] = ()  # branches with an inner norm (DNP)
    reparam: str = "none"


@dataclass
class LayerState:
    """One decoder layer. Output-Norm scales are ``None`` when the shape has no such norm, a tensor
    (ones when the norm has no learnable scale) otherwise."""

    attn: NormGroup  # branches q, k, v (weights in Hugging Face order: heads, then head_dim)
    o_proj: torch.Tensor
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    post_attn_norm: Optional[torch.Tensor]
    mlp: NormGroup  # gate, up (or fc1) | router, e0.gate, e0.up, e1.gate, ...
    down: List[torch.Tensor]  # one per expert (one for a dense MLP)
    post_mlp_norm: Optional[torch.Tensor]


def _is_ones(t: Optional[torch.Tensor]) -> bool:
    return t is None or bool(torch.all(t == 1))


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return _is_ones(a) and _is_ones(b)
    return a.shape == b.shape and torch.equal(a, b)


def _mul(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


def _fold_cols(group_name: str, b: str, frozen: Sequence[str], w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if b in frozen and not _is_ones(s):
        raise ConversionError(
            f"{group_name}: the scale would have to be folded into {b}, whose weight is tied "
            "to the embedding; untie the embeddings or keep a learnable final-norm scale"
        )
    return w * s.to(w.dtype)[None, :]


def _fold_rows(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return w * s.to(w.dtype)[:, None]


def _split_sign(name: str, v: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if bool((v == 0).any()):
        raise ConversionError(
            f"{name}: an ER (exponential) scale vector cannot represent zero entries; "
            "choose the 'or' or plain reparameterization"
        )
    if bool((v > 0).all()):
        return v, None
    return v.abs(), torch.sign(v)


def resolve_group(g: NormGroup, t: GroupTarget, name: str, reasons: List[str]) -> NormGroup:
    """``g`` rewritten for target ``t`` (see module docstring). Appends function-changing steps to
    ``reasons``."""
    names = list(g.branches)
    eff = {b: _mul(g.gamma, br.in_scale) for b, br in g.branches.items()}
    new = {b: Branch(br.weight, None, None, b in t.inner) for b, br in g.branches.items()}
    gamma = None
    if t.branch_scales:
        for b in names:
            e = eff[b]
            new[b].in_scale = e.clone() if e is not None else torch.ones(br_in(g, b), dtype=g.branches[b].weight.dtype)
    else:
        first = eff[names[0]]
        all_equal = all(_same(eff[b], first) for b in names)
        if t.shared_scale and all_equal:
            gamma = first.clone() if first is not None else torch.ones(br_in(g, names[0]))
        else:
            gamma = torch.ones(br_in(g, names[0])) if t.shared_scale else None
            for b in names:
                if eff[b] is not None:
                    new[b].weight = _fold_cols(name, b, g.frozen, new[b].weight, eff[b])
    for b, br in g.branches.items():
        tgt_inner = b in t.inner
        if br.inner_norm != tgt_inner:
            reasons.append(f"{name}.{b}: {'adds' if tgt_inner else 'removes'} an inner normalization (DNP)")
        u = br.out_scale
        if b in t.output_scales or tgt_inner:
            new[b].out_scale = u.clone() if u is not None else torch.ones(br.weight.shape[0])
        elif u is not None:
            new[b].weight = _fold_rows(new[b].weight, u)
    if t.reparam == "er":
        if gamma is not None:
            gamma, sign = _split_sign(f"{name} norm scale", gamma)
            if sign is not None:
                for b in names:
                    new[b].weight = _fold_cols(name, b, g.frozen, new[b].weight, sign)
        for b in names:
            if new[b].in_scale is not None:
                new[b].in_scale, sign = _split_sign(f"{name}.{b} input scale", new[b].in_scale)
                if sign is not None:
                    new[b].weight = _fold_cols(name, b, g.frozen, new[b].weight, sign)
            if new[b].out_scale is not None:
                new[b].out_scale, sign = _split_sign(f"{name}.{b} output scale", new[b].out_scale)
                if sign is not None:
                    new[b].weight = _fold_rows(new[b].weight, sign)
    return NormGroup(gamma, new, g.frozen)


def br_in(g: NormGroup, b: str) -> int:
    return g.branches[b].weight.shape[1]


def resolve_output_norm(
    value: Optional[torch.Tensor], target_has_scale: bool, reparam: str, name: str
) -> Optional[torch.Tensor]:
    """An Output-Norm scale (QK-norm, post-norm) for the target: kept, or dropped (None) when the target
    norm has no scale (the caller has recorded that as a function change)."""
    if value is None:
        return None
    if not target_has_scale:
        return None
    if reparam == "er" and not bool((value > 0).all()):
        raise ConversionError(
            f"{name}: an ER scale vector can only hold positive values, and an Output-Norm "
            "scale cannot move its sign elsewhere; choose the 'or' or plain reparameterization"
        )
    return value.clone()


def fold_for_hf(g: NormGroup) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """For export: (norm weight, folded weights, inner-norm output scales). Everything foldable is folded;
    u_b of inner-norm branches stays separate."""
    t = GroupTarget(
        shared_scale=True, branch_scales=False, inner=tuple(b for b, br in g.branches.items() if br.inner_norm)
    )
    r = resolve_group(g, t, "export", [])
    weights = {b: br.weight for b, br in r.branches.items()}
    inner = {b: br.out_scale for b, br in r.branches.items() if br.inner_norm}
    return r.gamma, weights, inner


# ----------------------------------------------------------------------------------------------------
# targets of a megatron_sv model
# ----------------------------------------------------------------------------------------------------
def attn_target(sv) -> GroupTarget:
    names = ("q", "k", "v")
    return GroupTarget(
        shared_scale=sv.learnable and not sv.branch_specific,
        branch_scales=sv.learnable and sv.branch_specific,
        output_scales=names if sv.output_side else (),
        inner=("q", "k") if sv.has_inner_norms else (),
        reparam=sv.reparam,
    )


def mlp_target(sv, branch_names: Sequence[str]) -> GroupTarget:
    inner = tuple(b for b in branch_names if b != "router") if sv.has_inner_norms else ()
    return GroupTarget(
        shared_scale=sv.learnable and not sv.branch_specific,
        branch_scales=sv.learnable and sv.branch_specific,
        output_scales=tuple(branch_names) if sv.output_side else (),
        inner=inner,
        reparam=sv.reparam,
    )


def final_target(sv) -> GroupTarget:
    return GroupTarget(shared_scale=sv.learnable, branch_scales=False, reparam=sv.reparam)


def strategy_change_reasons(src_sv, dst_sv, shape) -> List[str]:
    """Function changes known from the two configurations alone (before any tensor is read)."""
    out = []
    if src_sv.has_inner_norms != dst_sv.has_inner_norms:
        out.append(
            "inner normalizations (DNP: q/k per head, gate/up over the ffn width) are "
            + ("added" if dst_sv.has_inner_norms else "removed")
            + "; no choice of weights makes the new model compute the old function"
        )
    if src_sv.learnable and not dst_sv.learnable and (shape.qk_layernorm or shape.post_sublayer_norm):
        out.append(
            "the learnable scales of the QK-norm / post-sub-layer Output-Norms are dropped "
            "(strategy 'none'); they cannot be folded into a linear map"
        )
    return out


def check_normalization_for_moves(shape, what: str) -> None:
    if shape.normalization != "RMSNorm":
        raise ConversionError(
            f"{what} needs RMSNorm: with LayerNorm the norm's additive shift sits between the scale vectors "
            f"and the weights, so vectors cannot be moved exactly (this model uses {shape.normalization})"
        )
