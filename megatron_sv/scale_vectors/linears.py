"""Linear maps that carry scale vectors, as drop-in Megatron-Core column/row-parallel linears.

``ScaledColumnParallelLinear`` is the input-side map of a norm (linear_qkv, linear_fc1, every expert's
linear_fc1). Depending on the strategy it owns:
  * branch input vectors gamma_b (HG), replicated over TP, gradient summed over TP;
  * branch output vectors u_b (DP/DNP), sharded with the rows they scale;
  * DNP inner norms N_b: per attention head for q/k, over the whole (TP-sharded) ffn width for gate/up.
gamma_b and (except under DNP's inner norm) u_b are folded into the weight, so the layer runs one GEMM on
W_eff = diag(u) W diag(gamma_b) and never copies an activation per branch.

Branch vectors are stored one parameter per branch (q, k, v / gate, up). Each is TP-invariant in its
global order, so checkpoints reshard along axis 0 exactly like the weight rows they belong to.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .config import ScaleVectorConfig
from .folding import FoldLayout, fold_into_weight, recompute_saved_weight
from .generation import parameters_generation
from .inner_norms import norm_swiglu, scaled_inner_norm
from .norms import ScaledNorm
from .step_fold import StepFoldState
from .vector import ScaleVector, VectorSpec

BranchLayout = Literal["qkv", "gated_fc1", "fc1"]


def _vector_value(vec, values):
    """The vector's value: from its own parameters, or ``values[vec]`` (step_fold passes fp32 masters)."""
    return vec() if values is None else values[vec]


class ScaledColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear + scale vectors for its branches (see module docstring)."""

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
        self.sv = sv
        # How W_eff is made: per micro-batch until step_fold.attach() chooses otherwise (step_fold.py).
        self.step_fold = StepFoldState()
        self._step_fold: Optional[torch.Tensor] = None  # FP8's own W_eff leaf (see _fold_per_step)
        self._step_fold_key = None
        self.branch_layout = branch_layout
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_size = tp
        rows_local = self.output_size_per_partition
        if branch_layout == "qkv":
            ng, nh, hn = (
                config.num_query_groups or config.num_attention_heads,
                config.num_attention_heads,
                config.kv_channels,
            )
            if ng % tp != 0:
                raise ValueError(
                    f"scale vectors on linear_qkv need num_query_groups ({ng}) divisible by the "
                    f"tensor-parallel size ({tp})"
                )
            qpg = nh // ng
            self.heads_per_group = qpg
            self.layout = FoldLayout(groups=ng // tp, slots=qpg + 2, rows=hn)
            self.slot_branch = ["q"] * qpg + ["k", "v"]
            branch_rows = {"q": nh * hn, "k": ng * hn, "v": ng * hn}
            inner_norm_branches = ("q", "k")
        elif branch_layout == "gated_fc1":
            self.layout = FoldLayout(groups=1, slots=2, rows=rows_local // 2)
            self.slot_branch = ["gate", "up"]
            branch_rows = {"gate": output_size // 2, "up": output_size // 2}
            inner_norm_branches = ("gate", "up")
        elif branch_layout == "fc1":
            self.layout = FoldLayout(groups=1, slots=1, rows=rows_local)
            self.slot_branch = ["fc1"]
            branch_rows = {"fc1": output_size}
            inner_norm_branches = ("fc1",)
        else:
            raise ValueError(f"unknown branch layout {branch_layout!r}")
        if self.layout.out_features != rows_local:
            raise ValueError(f"{branch_layout} layout {self.layout} does not match {rows_local} local rows")
        self.branches = list(dict.fromkeys(self.slot_branch))
        self.inner_norm_branches = inner_norm_branches if sv.has_inner_norms else ()
        self.norm_kind = getattr(config, "normalization", "RMSNorm")
        self.norm_eps = config.layernorm_epsilon
        expert_parallel = self.is_expert and self.expert_parallel
        common = dict(tp_group=self.tp_group, params_dtype=config.params_dtype, expert_parallel=expert_parallel)

        self.input_scales = torch.nn.ModuleDict()
        if sv.learnable and sv.branch_specific:
            for b in self.branches:
                # Under DNP the branch's inner norm N_b removes any common factor of gamma_b: no magnitude.
                spec = VectorSpec(
                    size=input_size,
                    role="input",
                    reparam=sv.reparam,
                    grad_reduction="tp_sum",
                    is_expert=self.is_expert,
                    direction_only=b in self.inner_norm_branches,
                )
                self.input_scales[b] = ScaleVector(spec, **common)
        self.output_scales = torch.nn.ModuleDict()
        if sv.output_side:
            for b in self.branches:
                spec = VectorSpec(
                    size=branch_rows[b], role="output", reparam=sv.reparam, tp_sharded=True, is_expert=self.is_expert
                )
                self.output_scales[b] = ScaleVector(spec, **common)
        if self.input_scales or self.output_scales:
            # The GEMM's weight is a folded tensor: fused wgrad accumulation into main_grad cannot apply.
            self.gradient_accumulation_fusion = False

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

    # -- what step_fold needs (fold once per optimizer step) ----------------------------------------
    def folded_vectors(self):
        """The ScaleVectors that live in W_eff (their gradients come from the chain rule under step folds)."""
        return list(self.input_scales.values()) + [
            m for b, m in self.output_scales.items() if b not in self.inner_norm_branches
        ]

    def fold_scales(self, values=None):
        """(gamma per slot [slots, in] or None, u per row [groups, slots, rows] or None)."""
        return self._slot_input_scales(values), self._folded_output_scales(values)

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
                group=self.tp_group,
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
            group=self.tp_group,
        )

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
        if self._fold_per_step() and self._folds():
            out, bias = super().forward(input_, weight=self._step_folded_weight())  # FP8: the fold feeds its cast
        elif (step_weight := self.step_fold.weight_for_forward(self)) is not None:  # step_fold.py
            out, bias = super().forward(input_, weight=step_weight)
            if torch.is_grad_enabled():
                out = self.step_fold.mark_backward(self, out)
        else:
            w_eff = self.folded_weight()
            if w_eff is self.weight:
                out, bias = super().forward(input_)
            else:
                with recompute_saved_weight(w_eff, self._refold):
                    out, bias = super().forward(input_, weight=w_eff)
        if self.inner_norm_branches and apply_inner_norm:
            out = self._inner_norm_and_scale(out)
        return out, bias

    @torch.no_grad()
    def _refold(self) -> torch.Tensor:
        return self.folded_weight().detach()

    # -- FP8's own W_eff leaf (FP8ScaledColumnParallelLinear: the fold feeds the FP8 cast) ------------
    def _fold_per_step(self) -> bool:
        """True where the layer keeps its own per-step W_eff leaf (FP8); step_fold.py then leaves it alone."""
        return False

    def _folds(self) -> bool:
        return bool(self.input_scales) or any(b not in self.inner_norm_branches for b in self.output_scales)

    def _fold_params(self):
        return [self.weight] + [p for m in (self.input_scales, self.output_scales) for p in m.parameters()]

    def _step_folded_weight(self) -> torch.Tensor:
        """W_eff as a leaf that collects dL/dW_eff over all micro-batches of a step.

        W, gamma and u do not change between a step's micro-batches, and dL/dW = dL/dW_eff * (u gamma^T)
        is linear in the accumulated dL/dW_eff, so the fold and its chain rule run once per step
        (``flush_step_fold``, called before gradients are reduced) instead of once per micro-batch. Costs
        two weight-sized buffers per folded linear (the leaf and its gradient).
        """
        # writes through .data (mixed-precision copies, parameter all-gathers) do not bump _version
        key = (parameters_generation(),) + tuple((p.data_ptr(), p._version) for p in self._fold_params())
        if self._step_fold is None or self._step_fold_key != key:
            if self._step_fold is not None and self._step_fold.grad is not None:
                raise RuntimeError(
                    "the parameters changed before the folded-weight gradient was flushed; "
                    "call training_hooks.gradients_ready(model) before the optimizer step"
                )
            with torch.no_grad():
                self._step_fold = self.folded_weight().detach().requires_grad_(True)
            self._step_fold_key = key
        return self._step_fold

    def sv_gradients_ready(self) -> None:
        self.flush_step_fold()

    def flush_step_fold(self) -> None:
        """Apply the chain rule for the accumulated dL/dW_eff (a collective over TP for the vectors)."""
        leaf = self._step_fold
        if leaf is None or leaf.grad is None:
            return
        grad, leaf.grad = leaf.grad, None
        torch.autograd.backward(self.folded_weight(), grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A load writes W (checkpoints never hold W_eff): whatever fold the weight held is gone.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.step_fold.weight_overwritten(self)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        own = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if "." not in k}
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        kwargs = {"dp_cp_group": metadata["dp_cp_group"]} if metadata and "dp_cp_group" in metadata else {}
        out = make_sharded_tensors_for_checkpoint(
            own, prefix, {"weight": 0, "bias": 0}, sharded_offsets, tp_group=self.tp_group, **kwargs
        )
        for group_name in ("input_scales", "output_scales"):
            for b, vec in getattr(self, group_name).items():
                out.update(vec.sharded_state_dict(f"{prefix}{group_name}.{b}.", sharded_offsets, metadata))
        return out


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


class PostNormRowParallelLinear(RowParallelLinear):
    """RowParallelLinear followed by a post-sub-layer norm (Gemma / Peri-LN): an Output-Norm.

    The norm sees the hidden-complete output of the row-parallel reduction (sequence-sharded under SP,
    where its scale's gradient is partial and summed over TP).
    """

    def __init__(self, input_size, output_size, *, config, sv: ScaleVectorConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_norm = make_post_norm(config, output_size, sv, self.tp_group)

    def forward(self, input_):
        return apply_post_norm(self.post_norm, *super().forward(input_))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        own = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if "." not in k}
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        kwargs = {"dp_cp_group": metadata["dp_cp_group"]} if metadata and "dp_cp_group" in metadata else {}
        out = make_sharded_tensors_for_checkpoint(
            own, prefix, {"weight": 1}, sharded_offsets, tp_group=self.tp_group, **kwargs
        )
        out.update(self.post_norm.sharded_state_dict(f"{prefix}post_norm.", sharded_offsets, metadata))
        return out
