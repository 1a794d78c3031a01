"""Fold scale vectors into a weight once per optimizer step, where a copy of the weight already happens.

Folding per micro-batch (folding.FoldScaleVectors) costs about ten passes over |W| per micro-batch: on a
GPU about 900/T of the GEMM time (T tokens per micro-batch). Everything the fold depends on (W and the
vectors) is constant within a step, and the chain rule of W_eff = diag(u) W diag(gamma) is linear in
dL/dW_eff, so a folded linear can instead

  * run its micro-batches on a stored W_eff; W's ``main_grad`` (fp32, Megatron's DDP buffer) then
    accumulates dL/dW_eff over the step (the vectors get zero gradients so that DDP's bucketed, possibly
    overlapped reduction sees every parameter used);
  * once per step, after the data-parallel reduction (``apply_chain_rule``, called by the training hook
    ``before_optimizer_step``), turn it into the true gradients:
        dL/dW        = g * u gamma^T                        (in place, in main_grad)
        dL/dgamma_s  = sum over the rows r of slot s of g*W * u_r
        dL/du_r      = sum over the columns c of g*W * gamma_s(r),c
    and the vectors' own parameters (plain, OR, ER) by autograd through the small vector function, which
    also carries each vector's tensor-parallel reduction.

Plans, chosen per linear by ``attach`` (``FoldPlan``):
  ``micro_batch``  folding.py's per-micro-batch fold with recompute (no extra memory).
  ``master``       mixed precision: the bf16 model weight *is* W_eff = fold(W_master, s) in fp32, written
                   right after the optimizer copies its fp32 masters into the model weights (for the
                   distributed optimizer: this rank's shard, before the parameter all-gather, which then
                   carries W_eff). No extra memory; a few passes over |W| per step.
  ``cached``       fp32 (no master copy exists): a cached fp32 W_eff (|W| extra during forward/backward),
                   keyed on ``parameters_generation()`` and dropped at the chain rule.
fp32 layers choose by a cost model (``FoldPolicy``, docs/performance.md).
FP8 linears (megatron_sv/fp8/layers.py) use the same plans: their GEMM casts whatever weight the plan hands
it (under ``master`` the bf16 model weight holding W_eff) to FP8 once per ``parameters_generation()``, and
their weight gradient dL/dW_eff accumulates in the same fp32 ``main_grad``. In fp32 they always take
``cached`` (unless the policy says ``micro_batch``), since their cast copies the weight anyway.

Distributed optimizer: each rank owns a flat range of every parameter's elements (not row-aligned). The
fold and the chain rule work on that range; the vectors' full fp32 values and the partial sums of their
gradients are completed with one small all-reduce over the optimizer's data-parallel group.

Checkpoints never hold W_eff: ``checkpoint_tensors`` gives W (from the masters) to save in the folded
weights' place, and a load (``_load_from_state_dict``) marks the weight unfolded until
``after_parameters_changed`` folds it again from the restored masters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Literal, Optional, Tuple

import torch
import torch.distributed as dist

from .generation import bump, parameters_generation

FoldPlan = Literal["micro_batch", "master", "cached"]
FoldMode = Literal["auto", "micro_batch", "step"]
FOLD_MODES = ("auto", "micro_batch", "step")

# Per-micro-batch folding costs about FOLD_COST_PER_TOKEN / T of the folded GEMM's time (T tokens per
# micro-batch): measured about 33 on a 2-core AMX CPU, about 900 on an H100/H200 (docs/performance.md).
FOLD_COST_PER_TOKEN = {"cpu": 33.0, "cuda": 900.0}


@dataclass(frozen=True)
class FoldPolicy:
    """How folded linears without a master copy (fp32) fold; mixed precision always folds at the copy.

    mode: ``auto`` (cost model), ``step`` (cache every fp32 folded linear), ``micro_batch`` (fold per
    micro-batch everywhere, also under mixed precision: the reference path).
    The cost model caches a linear's W_eff when folding it per micro-batch would cost more than
    ``max_time_overhead`` of its GEMM time (``fold_cost_per_token / tokens_per_micro_batch``), there is
    more than one micro-batch per step, and the caches fit in ``cache_memory_fraction`` of the model's
    fp32 training state (parameters, gradients and Adam moments: 16 bytes per parameter).
    """

    mode: FoldMode = "auto"
    tokens_per_micro_batch: int = 0
    micro_batches_per_step: int = 1
    fold_cost_per_token: float = FOLD_COST_PER_TOKEN["cpu"]
    max_time_overhead: float = 0.01
    cache_memory_fraction: float = 0.01

    def __post_init__(self):
        if self.mode not in FOLD_MODES:
            raise ValueError(f"fold mode must be one of {list(FOLD_MODES)}, got {self.mode!r}")

    def micro_batch_overhead(self) -> float:
        """Estimated time of a per-micro-batch fold relative to the folded GEMM's time."""
        return self.fold_cost_per_token / max(self.tokens_per_micro_batch, 1)


# ----------------------------------------------------------------------------------------------------
# per-linear state, used by the linear's forward
# ----------------------------------------------------------------------------------------------------
class _StepFoldedWeight(torch.autograd.Function):
    """Forward: the cached W_eff. Backward: dL/dW_eff goes to W's gradient slot unchanged (main_grad
    accumulates it; the chain rule runs once per step)."""

    @staticmethod
    def forward(ctx, weight, w_eff):
        return w_eff.view_as(w_eff)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ZeroGradsFor(torch.autograd.Function):
    """Identity on ``out``; zero gradients for ``params`` so that DDP's per-parameter hooks fire (with
    --overlap-grad-reduce a bucket is reduced only once all its parameters reported a gradient)."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.metas = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.metas])


def _run_forward_pre_hooks(module: torch.nn.Module) -> None:
    """Run a module's forward pre-hooks without its forward. With --overlap-param-gather, Megatron's DDP
    waits for a bucket's parameter all-gather in the pre-hook of each module owning a parameter; a
    folded vector's module is not called when W_eff is stored, and an all-gather never waited for would
    break the next step's dispatch."""
    for hook in list(module._forward_pre_hooks.values()):
        hook(module, ())


class StepFoldState:
    """What a folded linear's weight holds and how its forward gets W_eff (see module docstring)."""

    def __init__(self):
        self.plan: FoldPlan = "micro_batch"
        self.weight_holds_fold = False  # plan "master": the model weight holds W_eff
        self.cache: Optional[torch.Tensor] = None  # plan "cached"
        self.cache_generation: Optional[int] = None
        self.chain_rule_pending = False  # a training forward ran since the last chain rule

    def weight_for_forward(self, linear) -> Optional[torch.Tensor]:
        """W_eff for this forward, or None for the per-micro-batch fold."""
        if self.plan == "master":
            if not self.weight_holds_fold:
                return None
            for vec in linear.folded_vectors():  # not called in this forward, but DDP must see them used
                _run_forward_pre_hooks(vec)
            return linear.weight
        if self.plan == "cached":
            if not self.cache_is_fresh():
                with torch.no_grad():
                    self.cache = linear.folded_weight().detach()
                self.cache_generation = parameters_generation()
            else:
                for vec in linear.folded_vectors():
                    _run_forward_pre_hooks(vec)
            return _StepFoldedWeight.apply(linear.weight, self.cache) if torch.is_grad_enabled() else self.cache
        return None

    def cache_is_fresh(self) -> bool:
        # never reuse a fold after the parameters changed (.data writes do not bump _version)
        return self.cache is not None and self.cache_generation == parameters_generation()

    def release_cache(self) -> None:
        self.cache = None

    def mark_backward(self, linear, out: torch.Tensor) -> torch.Tensor:
        self.chain_rule_pending = True
        return _ZeroGradsFor.apply(
            out, *[p for v in linear.folded_vectors() for p in v.parameters() if p.requires_grad]
        )

    def weight_overwritten(self, linear) -> None:
        self.weight_holds_fold = False
        self.cache = None


# ----------------------------------------------------------------------------------------------------
# where the fp32 values of a parameter live on this rank
# ----------------------------------------------------------------------------------------------------
@dataclass
class MasterShard:
    """fp32 values of the flat elements [start, end) of a model parameter held by this rank; ``group``:
    the data-parallel group whose ranks own the other ranges (None: this rank holds all of it)."""

    values: torch.Tensor
    start: int
    end: int
    group: Optional[dist.ProcessGroup]


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(sub) -> bool:
    return hasattr(sub, "model_param_gbuf_map") and hasattr(sub, "buffers")


def _group_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


class Masters:
    """Resolves a model parameter's fp32 master values under the plain, mixed-precision or distributed
    Megatron optimizer (or no optimizer: the parameter itself)."""

    def __init__(self, optimizer):
        self.subs = _sub_optimizers(optimizer) if optimizer is not None else []
        self._owner = {}
        for sub in self.subs:
            if _is_distributed(sub):
                params = [p for buf in sub.buffers for p in buf.param_index_map]
            else:  # mixed precision: model params in float16_groups / fp32_from_fp32_groups; fp32: param_groups
                groups = getattr(sub, "float16_groups", []) + getattr(sub, "fp32_from_fp32_groups", [])
                params = (
                    [p for g in groups for p in g] if groups else [p for g in sub.param_groups for p in g["params"]]
                )
            for p in params:
                self._owner.setdefault(p, sub)

    def owner(self, param):
        return self._owner.get(param)

    def shard(self, param) -> MasterShard:
        sub = self.owner(param)
        flat = param.detach().view(-1)
        if sub is not None and _is_distributed(sub):
            if param not in sub.model_param_gbuf_map:  # no element of it lives on this rank
                return MasterShard(flat.new_zeros(0, dtype=torch.float32), 0, 0, sub.data_parallel_group)
            rng = sub._get_model_param_range_map(param)["param"]
            values = flat[rng.start : rng.end] if param.dtype == torch.float32 else param.main_param
            return MasterShard(values, rng.start, rng.end, sub.data_parallel_group)
        main = getattr(param, "main_param", None)
        if param.dtype != torch.float32:
            if main is None:
                raise RuntimeError(
                    "a low-precision parameter without an fp32 master: fold once per step "
                    "needs Megatron's mixed-precision optimizer"
                )
            return MasterShard(main.view(-1), 0, param.numel(), None)
        return MasterShard(flat, 0, param.numel(), None)

    def has_master_copy(self, param) -> bool:
        return param.dtype != torch.float32 and self.owner(param) is not None


def _all_reduce_in_groups(items: List[Tuple[torch.Tensor, Optional[dist.ProcessGroup]]]) -> None:
    """Sum each tensor over its group, with one all-reduce per group (fp32 tensors, in place)."""
    by_group: Dict[int, Tuple[dist.ProcessGroup, List[torch.Tensor]]] = {}
    for t, g in items:
        if _group_size(g) > 1:
            by_group.setdefault(id(g), (g, []))[1].append(t)
    for g, tensors in by_group.values():  # same order on every rank: first appearance in module order
        if len(tensors) == 1 and tensors[0].is_contiguous():
            dist.all_reduce(tensors[0], group=g)
            continue
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=g)
        offset = 0
        for t in tensors:
            t.view(-1).copy_(flat[offset : offset + t.numel()])
            offset += t.numel()


def _full_values(shards: List[MasterShard], params: List[torch.nn.Parameter]) -> List[torch.Tensor]:
    """Full fp32 values of small parameters from their (possibly DP-sharded) masters."""
    out, pending = [], []
    for s, p in zip(shards, params):
        if s.group is None or _group_size(s.group) == 1:
            out.append(s.values.detach().float().view(p.shape).clone())
            continue
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        full[s.start : s.end] = s.values.detach()
        pending.append((full, s.group))
        out.append(full.view(p.shape))
    _all_reduce_in_groups(pending)
    return out


def row_pieces(start: int, end: int, in_features: int, rows_per_block: int):
    """Split the flat range [start, end) of a [rows, in_features] weight into 2-D pieces whose rows share
    one block of ``rows_per_block`` rows (one slot, hence one input vector).

    Yields (row0, nrows, col0, ncols, offset) with ``offset`` counted from ``start``.
    """
    pos = start
    while pos < end:
        row, col = divmod(pos, in_features)
        if col or end - pos < in_features:  # a partial row
            ncols = min(in_features - col, end - pos)
            yield row, 1, col, ncols, pos - start
            pos += ncols
        else:
            block_end = (row // rows_per_block + 1) * rows_per_block
            nrows = min(block_end - row, (end - pos) // in_features)
            yield row, nrows, 0, in_features, pos - start
            pos += nrows * in_features


# ----------------------------------------------------------------------------------------------------
# the per-step fold for a set of linears
# ----------------------------------------------------------------------------------------------------
class StepFolder:
    """Folds, unfolds and applies the chain rule for every step-folded linear of some model chunks."""

    def __init__(self, chunks: Iterable[torch.nn.Module], optimizer, policy: FoldPolicy):
        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.policy = policy
        self.masters = Masters(optimizer)
        self.linears = [
            m
            for c in self.chunks
            for m in c.modules()
            if isinstance(getattr(m, "step_fold", None), StepFoldState) and m._folds()
        ]
        self._choose_plans()
        self._install_fold_at_copy()

    # -- plans ------------------------------------------------------------------------------------
    def _choose_plans(self) -> None:
        fp32 = []
        for lin in self.linears:
            if self.masters.has_master_copy(lin.weight):
                lin.step_fold.plan = "master"
                # the GEMM reads the parameter itself again: Megatron's fused wgrad accumulation may apply
                # (not to an FP8 GEMM, whose wgrad returns the gradient for DDP's hook to add to main_grad)
                lin.gradient_accumulation_fusion = lin.config.gradient_accumulation_fusion and not lin.casts_weight
            else:
                fp32.append(lin)
        p = self.policy
        if p.mode == "micro_batch":  # also no fold at the copy: the per-micro-batch reference everywhere
            for lin in self.linears:
                lin.step_fold.plan = "micro_batch"
            return
        # --sv-fold-once-per-step; FP8 layers: their weight cast is a copy per forward, once per step if cached
        forced = [m for m in fp32 if m.sv.fold_once_per_step or m.casts_weight]
        if p.mode == "step":
            chosen = fp32
        elif (
            p.mode == "micro_batch" or p.micro_batches_per_step <= 1 or p.micro_batch_overhead() <= p.max_time_overhead
        ):
            chosen = []
        else:
            numel = sum(q.numel() for c in self.chunks for q in c.parameters())
            budget = p.cache_memory_fraction * 16 * numel  # bytes: fp32 param + grad + two Adam moments
            chosen, used = [], 0
            for lin in sorted(fp32, key=lambda m: m.weight.numel()):  # small first: most layers per byte
                cost = lin.weight.numel() * lin.weight.element_size()
                if used + cost <= budget:
                    chosen.append(lin)
                    used += cost
        for lin in fp32:
            lin.step_fold.plan = "cached" if (lin in chosen or lin in forced) else "micro_batch"

    def plans(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for lin in self.linears:
            out[lin.step_fold.plan] = out.get(lin.step_fold.plan, 0) + 1
        return out

    def _master_linears(self, sub=None) -> list:
        return [
            m
            for m in self.linears
            if m.step_fold.plan == "master" and (sub is None or self.masters.owner(m.weight) is sub)
        ]

    # -- folding at the master -> model copy ---------------------------------------------------------
    def _install_fold_at_copy(self) -> None:
        """Wrap this optimizer instance's master -> model copy (nothing in megatron-core is patched)."""
        for sub in self.masters.subs:
            mine = self._master_linears(sub)
            if not mine:
                continue
            copy_to_model, copy_to_main = sub._copy_main_params_to_model_params, sub._copy_model_params_to_main_params

            def copy_and_fold(copy_to_model=copy_to_model, mine=mine):
                if any(m.step_fold.chain_rule_pending for m in mine):
                    raise RuntimeError(
                        "the optimizer stepped on dL/dW_eff: call "
                        "training_hooks.before_optimizer_step before optimizer.step()"
                    )
                copy_to_model()
                self.fold_from_masters(mine)

            def guarded_copy_to_main(*args, copy_to_main=copy_to_main, mine=mine, **kwargs):
                if any(m.step_fold.weight_holds_fold for m in mine):
                    raise RuntimeError(
                        "the model weights hold folded W_eff; reload the masters only from "
                        "unfolded weights (e.g. right after a weights-only checkpoint load)"
                    )
                return copy_to_main(*args, **kwargs)

            sub._copy_main_params_to_model_params = copy_and_fold
            sub._copy_model_params_to_main_params = guarded_copy_to_main

    def _vector_values(self, linears) -> List[Dict]:
        """Per linear: {vector module: {param name: full fp32 value}} from the masters."""
        shards, params, where = [], [], []
        for i, lin in enumerate(linears):
            for vec in lin.folded_vectors():
                for name, q in vec.named_parameters():
                    if not q.requires_grad:  # a fixed part (not trained): the module's own value is exact
                        continue
                    shards.append(self.masters.shard(q))
                    params.append(q)
                    where.append((i, vec, name))
        values = _full_values(shards, params)
        out: List[Dict] = [dict() for _ in linears]
        for (i, vec, name), v in zip(where, values):
            out[i].setdefault(vec, {})[name] = v
        return out

    @staticmethod
    def _scales(lin, vector_params: Dict) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        # value_from, not a module call: DDP's parameter all-gather pre-hooks must not fire inside a step
        values = {vec: vec.value_from(vector_params.get(vec, {})) for vec in lin.folded_vectors()}
        s_in, s_out = lin.fold_scales(values)
        return s_in, (s_out.reshape(-1) if s_out is not None else None)

    @torch.no_grad()
    def fold_from_masters(self, linears) -> None:
        """Write fold(W_master, s) into this rank's range of each model weight (all of it, or its shard
        before the distributed optimizer's all-gather)."""
        for lin, vparams in zip(linears, self._vector_values(linears)):
            s_in, s_out = self._scales(lin, vparams)
            shard = self.masters.shard(lin.weight)
            model = lin.weight.detach().view(-1)[shard.start : shard.end]
            for row0, nrows, col0, ncols, off in row_pieces(
                shard.start, shard.end, lin.weight.shape[1], lin.layout.rows
            ):
                w = shard.values[off : off + nrows * ncols].view(nrows, ncols).float()
                if s_in is not None:
                    w = w * s_in[(row0 // lin.layout.rows) % lin.layout.slots, col0 : col0 + ncols]
                if s_out is not None:
                    w = w * s_out[row0 : row0 + nrows, None]
                model[off : off + nrows * ncols].view(nrows, ncols).copy_(w)
            lin.step_fold.weight_holds_fold = True
        bump()  # the weights changed: caches keyed on the generation (an FP8 cast of W_eff) must not be reused

    def refold_where_needed(self) -> None:
        """After a load: fold again from the restored masters (and all-gather the distributed shards).

        Loads happen on every rank of a data-parallel group alike, so all of them take the same branch.
        """
        if all(m.step_fold.weight_holds_fold for m in self._master_linears()):
            return
        self.fold_from_masters(self._master_linears())
        if any(_is_distributed(s) for s in self.masters.subs):
            for chunk in self.chunks:
                if hasattr(chunk, "start_param_sync"):
                    chunk.start_param_sync(force_sync=True)

    # -- the chain rule, once per step -------------------------------------------------------------
    def apply_chain_rule(self) -> None:
        """dL/dW_eff in main_grad (reduced over DP) -> dL/dW in place, and the vectors' gradients added to
        their main_grad. Collective over TP (vector functions) and the optimizer's DP group."""
        linears = [m for m in self.linears if m.step_fold.plan != "micro_batch"]
        if not linears:
            return
        vparams = self._vector_values(linears)
        partials, pending = [], []
        with torch.no_grad():
            for lin, vp in zip(linears, vparams):
                s_in, s_out = self._scales(lin, vp)
                g_in = torch.zeros_like(s_in) if s_in is not None else None
                g_out = torch.zeros_like(s_out) if s_out is not None else None
                shard = self.masters.shard(lin.weight)
                grad = lin.weight.main_grad.view(-1)[shard.start : shard.end]
                lay = lin.layout
                for row0, nrows, col0, ncols, off in row_pieces(shard.start, shard.end, lin.weight.shape[1], lay.rows):
                    g = grad[off : off + nrows * ncols].view(nrows, ncols)
                    w = shard.values[off : off + nrows * ncols].view(nrows, ncols)
                    gw = g * w
                    rows = slice(row0, row0 + nrows)
                    sin = s_in[(row0 // lay.rows) % lay.slots, col0 : col0 + ncols] if s_in is not None else None
                    if g_in is not None:
                        part = s_out[rows] @ gw if s_out is not None else gw.sum(0)
                        g_in[(row0 // lay.rows) % lay.slots, col0 : col0 + ncols] += part
                    if g_out is not None:
                        g_out[rows] += gw @ sin if sin is not None else gw.sum(1)
                    if sin is not None:
                        g.mul_(sin)
                    if s_out is not None:
                        g.mul_(s_out[rows, None])
                partials.append((g_in, g_out))
                for t in (g_in, g_out):
                    if t is not None:
                        pending.append((t, shard.group))
                lin.step_fold.chain_rule_pending = False
                lin.step_fold.release_cache()  # not needed before the next forward: frees |W| for the step
        self._sum_partials(pending)
        for lin, vp, (g_in, g_out) in zip(linears, vparams, partials):
            leaves = {
                vec: {n: v.detach().requires_grad_(True) for n, v in params.items()} for vec, params in vp.items()
            }
            with torch.enable_grad():
                s_in, s_out = self._scales(lin, leaves)
                outs = [t for t in (s_in, s_out) if t is not None]
                grads = [t for t in (g_in, g_out) if t is not None]
                torch.autograd.backward(outs, grads)
            with torch.no_grad():
                for vec, params in leaves.items():
                    named = dict(vec.named_parameters())
                    for n, leaf in params.items():
                        if leaf.grad is not None:
                            named[n].main_grad.add_(leaf.grad.to(named[n].main_grad.dtype))

    @staticmethod
    def _sum_partials(pending) -> None:
        """Complete the vectors' gradient partial sums of DP-sharded weights (one small all-reduce)."""
        _all_reduce_in_groups(pending)

    def check_no_pending(self) -> None:
        if any(m.step_fold.chain_rule_pending for m in self.linears):
            raise RuntimeError(
                "parameters changed while dL/dW_eff was still in main_grad: call "
                "training_hooks.before_optimizer_step before optimizer.step()"
            )

    # -- checkpoints --------------------------------------------------------------------------------
    @torch.no_grad()
    def checkpoint_tensors(self) -> Dict[int, torch.Tensor]:
        """{id(model weight): W in the model dtype} for every weight that holds W_eff (collective)."""
        out = {}
        for lin in self._master_linears():  # one weight at a time: at most one fp32 |W| temporary
            shard = self.masters.shard(lin.weight)
            full = torch.zeros(lin.weight.numel(), dtype=torch.float32, device=lin.weight.device)
            full[shard.start : shard.end] = shard.values
            _all_reduce_in_groups([(full, shard.group)])
            if lin.step_fold.weight_holds_fold:
                out[id(lin.weight)] = full.to(lin.weight.dtype).view_as(lin.weight)
        return out


def attach(chunks, optimizer, policy: FoldPolicy) -> StepFolder:
    """Choose each folded linear's plan and fold the master-plan weights now (collective)."""
    folder = StepFolder(chunks, optimizer, policy)
    for lin in folder._master_linears():
        lin.step_fold.weight_holds_fold = False
    folder.refold_where_needed()
    return folder


def fold_overhead_estimate(policy: FoldPolicy) -> float:
    """The per-micro-batch fold's estimated share of the folded GEMM's time (for logs and docs)."""
    return policy.micro_batch_overhead() if policy.tokens_per_micro_batch else math.inf
