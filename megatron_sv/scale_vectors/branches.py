"""The scale vectors of a fused input-side linear map, written once for every backend.

An input-side map of a norm (linear_qkv, linear_fc1, every expert's linear_fc1) is one GEMM over several
branches (q, k, v / gate, up). Depending on the strategy it owns:
  * branch input vectors gamma_b (HG), replicated over TP, gradient summed over TP;
  * branch output vectors u_b (DP/DNP), sharded with the rows they scale;
  * DNP inner norms N_b: per attention head for q/k, over the whole (TP-sharded) ffn width for gate/up.
gamma_b and (except under DNP's inner norm) u_b are folded into the weight, so the layer runs one GEMM on
W_eff = diag(u) W diag(gamma_b) and never copies an activation per branch. How W_eff is made (per
micro-batch, or once per optimizer step) is step_fold.py's choice.

``BranchScaleVectors`` is a mixin holding all of this: which vectors, where, their roles and reductions,
the fold, the inner norms, the forward around the GEMM and the checkpoint entries of the vectors. A
backend's column-parallel linear (local: linears.py; FP8: megatron_sv/fp8/layers.py; Transformer Engine:
te_modules.py) mixes it in and supplies only ``_gemm`` (its GEMM on a given weight) and its own plumbing
(which attribute holds the TP group, how fused wgrad accumulation is switched off).

Branch vectors are stored one parameter per branch. Each is TP-invariant in its global order, so
checkpoints reshard along axis 0 exactly like the weight rows they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

import torch
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import get_pg_size

from .config import ScaleVectorConfig
from .folding import FoldLayout, fold_into_weight, recompute_saved_weight
from .inner_norms import norm_swiglu, scaled_inner_norm
from .step_fold import StepFoldState
from .vector import ScaleVector, VectorSpec

BranchLayout = Literal["qkv", "gated_fc1", "fc1"]


@dataclass(frozen=True)
class BranchPlan:
    """How a fused column-parallel weight splits into branches on this TP rank."""

    layout: FoldLayout
    slot_branch: Tuple[str, ...]  # the branch of each slot of a group ([q.., k, v] or [gate, up])
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
    """The row layout of a fused weight: linear_qkv interleaves [q heads of a group, k, v] per query group
    on each TP rank; a gated linear_fc1 is [gate_local | up_local]."""
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
        plan = BranchPlan(
            FoldLayout(groups=ng // tp_size, slots=qpg + 2, rows=hn),
            tuple(["q"] * qpg + ["k", "v"]),
            {"q": nh * hn, "k": ng * hn, "v": ng * hn},
            ("q", "k"),
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


def _vector_value(vec, values):
    """The vector's value: from its own parameters, or ``values[vec]`` (step_fold passes fp32 masters)."""
    return vec() if values is None else values[vec]


class BranchScaleVectors:
    """Mixin for a column-parallel linear: the scale vectors of its branches (see module docstring).

    The backend class calls ``_init_branch_vectors`` at the end of its ``__init__`` and implements
    ``_gemm(x, weight)``: its GEMM (with its tensor-parallel communication) on ``weight``, or on its own
    weight parameter when ``weight`` is None; returns (output, bias).
    """

    # True where the GEMM copies its weight in every forward anyway (an FP8 cast): step_fold then folds
    # once per step also in fp32, so that the copy happens once per step too.
    casts_weight = False

    def _init_branch_vectors(
        self,
        *,
        input_size: int,
        output_size: int,
        config,
        sv: ScaleVectorConfig,
        branch_layout: BranchLayout,
        tp_group,
        is_expert: bool,
        expert_parallel: bool,
    ) -> None:
        self.sv = sv
        # How W_eff is made: per micro-batch until step_fold.attach() chooses otherwise (step_fold.py).
        self.step_fold = StepFoldState()
        self.branch_layout = branch_layout
        self.branch_tp_group = tp_group
        self.tp_size = get_pg_size(tp_group)
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
        common = dict(tp_group=tp_group, params_dtype=config.params_dtype, expert_parallel=expert_parallel)

        self.input_scales = torch.nn.ModuleDict()
        if sv.learnable and sv.branch_specific:
            for b in self.branches:
                # Under DNP the branch's inner norm N_b removes any common factor of gamma_b: no magnitude.
                spec = VectorSpec(
                    size=input_size,
                    role="input",
                    reparam=sv.reparam,
                    grad_reduction="tp_sum",
                    is_expert=is_expert,
                    direction_only=b in self.inner_norm_branches,
                )
                self.input_scales[b] = ScaleVector(spec, **common)
        self.output_scales = torch.nn.ModuleDict()
        if sv.output_side:
            for b in self.branches:
                spec = VectorSpec(
                    size=plan.branch_rows[b], role="output", reparam=sv.reparam, tp_sharded=True, is_expert=is_expert
                )
                self.output_scales[b] = ScaleVector(spec, **common)
        # the vectors live where the backend put the weight (the GPU unless initialized on the CPU)
        self.input_scales.to(self.weight.device)
        self.output_scales.to(self.weight.device)

    def _gemm(self, input_: torch.Tensor, weight: Optional[torch.Tensor]):
        raise NotImplementedError(f"{type(self).__name__} must implement _gemm (its backend's GEMM)")

    # -- folding ----------------------------------------------------------------------------------
    def _slot_input_scales(self, values=None) -> Optional[torch.Tensor]:
        if not self.input_scales:
            return None
        vecs = {b: _vector_value(m, values) for b, m in self.input_scales.items()}
        return torch.stack([vecs[b] for b in self.slot_branch])

    def _folded_output_scales(self, values=None) -> Optional[torch.Tensor]:
        """Per-row u for the branches whose u is folded (all under DP; v only under DNP)."""
        folded = [b for b in self.output_scales if b not in self.inner_norm_branches]
        if not folded:
            return None
        lay = self.layout
        parts = []
        for b in self.branches:
            n_slots = self.slot_branch.count(b)
            if b in folded:
                parts.append(_vector_value(self.output_scales[b], values).view(lay.groups, n_slots, lay.rows))
            else:
                parts.append(None)
        dtype = next(p for p in parts if p is not None).dtype
        parts = [
            p
            if p is not None
            else torch.ones(lay.groups, self.slot_branch.count(b), lay.rows, dtype=dtype, device=self.weight.device)
            for b, p in zip(self.branches, parts)
        ]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def folded_weight(self) -> torch.Tensor:
        return fold_into_weight(self.weight, self.layout, self._slot_input_scales(), self._folded_output_scales())

    @torch.no_grad()
    def _refold(self) -> torch.Tensor:
        return self.folded_weight().detach()

    # -- what step_fold needs (fold once per optimizer step) ----------------------------------------
    def folded_vectors(self):
        """The ScaleVectors that live in W_eff (their gradients come from the chain rule under step folds)."""
        return list(self.input_scales.values()) + [
            m for b, m in self.output_scales.items() if b not in self.inner_norm_branches
        ]

    def fold_scales(self, values=None):
        """(gamma per slot [slots, in] or None, u per row [groups, slots, rows] or None)."""
        return self._slot_input_scales(values), self._folded_output_scales(values)

    def _folds(self) -> bool:
        """Whether any vector lives in W_eff (otherwise the GEMM reads W itself)."""
        return bool(self.folded_vectors())

    # -- DNP inner norms --------------------------------------------------------------------------
    def _inner_norm_and_scale(self, out: torch.Tensor) -> torch.Tensor:
        """u_b * N_b on the inner-norm branches, in one call over the whole fused output (no split and
        re-join, so the result is the tensor the next op keeps; see inner_norms.scaled_inner_norm)."""
        lay = self.layout
        y = out.view(*out.shape[:-1], lay.groups, lay.slots, lay.rows)
        u_parts, active = [], []
        for b in self.branches:
            n = self.slot_branch.count(b)
            if b in self.inner_norm_branches:
                u_parts.append(self.output_scales[b]().view(lay.groups, n, lay.rows))
            else:  # folded into the weight already (v under DNP): passes through
                u_parts.append(torch.ones(lay.groups, n, lay.rows, dtype=self.weight.dtype, device=out.device))
            active += [b in self.inner_norm_branches] * n
        u = torch.cat(u_parts, dim=1) if len(u_parts) > 1 else u_parts[0]
        mask = None if all(active) else torch.tensor(active, device=out.device).view(lay.slots, 1)
        if self.branch_layout == "qkv":  # per attention head over head_dim
            z = scaled_inner_norm(y, u, self.norm_kind, self.norm_eps, active=mask)
        else:  # over the whole ffn width, identical at any TP degree
            z = scaled_inner_norm(
                y,
                u,
                self.norm_kind,
                self.norm_eps,
                full_width=lay.rows * self.tp_size,
                group=self.branch_tp_group,
                active=mask,
            )
        return z.view(out.shape)

    def inner_norm_swiglu(self, out: torch.Tensor) -> torch.Tensor:
        """silu(u_gate N(gate)) * u_up N(up) of this layer's output taken with ``apply_inner_norm=False``:
        DNP's gate/up norm and SwiGLU in one fused op (see inner_norms.norm_swiglu)."""
        if self.branch_layout != "gated_fc1" or self.inner_norm_branches != ("gate", "up"):
            raise ValueError("inner_norm_swiglu needs a gated linear_fc1 with DNP's inner norms")
        return norm_swiglu(
            out,
            self.output_scales["gate"](),
            self.output_scales["up"](),
            self.norm_kind,
            self.norm_eps,
            full_width=self.layout.rows * self.tp_size,
            group=self.branch_tp_group,
        )

    # -- the forward around the backend's GEMM ------------------------------------------------------
    def _branch_forward(self, input_: torch.Tensor, apply_inner_norm: bool = True):
        """(output, bias) of the GEMM on W_eff, then DNP's inner norms unless ``apply_inner_norm=False``
        (the MLP fuses gate/up's with SwiGLU)."""
        if (step_weight := self.step_fold.weight_for_forward(self)) is not None:  # step_fold.py
            out, bias = self._gemm(input_, step_weight)
            if torch.is_grad_enabled():
                out = self.step_fold.mark_backward(self, out)
        else:
            w_eff = self.folded_weight()
            if w_eff is self.weight:
                out, bias = self._gemm(input_, None)
            else:
                with recompute_saved_weight(w_eff, self._refold):
                    out, bias = self._gemm(input_, w_eff)
        if self.inner_norm_branches and apply_inner_norm:
            out = self._inner_norm_and_scale(out)
        return out, bias

    # -- checkpoints --------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A load writes W (checkpoints never hold W_eff): whatever fold the weight held is gone.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.step_fold.weight_overwritten(self)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The backend linear's own entries (its weight, sharded along axis 0) and each vector's, with its
        own sharding (output-side vectors follow the rows they scale)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        nested = tuple(f"{prefix}{group}." for group in ("input_scales", "output_scales"))
        out = {
            k: v
            for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
            if not k.startswith(nested)
        }
        for group_name in ("input_scales", "output_scales"):
            for b, vec in getattr(self, group_name).items():
                out.update(vec.sharded_state_dict(f"{prefix}{group_name}.{b}.", sharded_offsets, metadata))
        return out
