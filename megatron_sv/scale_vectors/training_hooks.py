"""The one interface between a training loop and the scale-vector method.

Training code never reaches into the method's modules; it calls these functions at fixed points of a
run, and every module that needs to act at that point implements the matching method:

* ``optimizer_ready(chunks, optimizer, policy)``: once, after the optimizer exists (before any load).
  Chooses how each folded linear folds (step_fold.py: at the optimizer's master -> model copy under
  mixed precision; per micro-batch or a cached per-step fold in fp32, by ``policy``) and folds.
* ``gradients_ready(chunks)``: all micro-batches' backward passes are done, gradients are not yet
  reduced over data-parallel ranks (Megatron's ``finalize_model_grads``). Modules: ``sv_gradients_ready()``.
* ``before_optimizer_step(chunks, optimizer)``: gradients are reduced, the optimizer is about to read
  them. The per-step fold's chain rule runs here (dL/dW_eff -> dL/dW and the vectors' gradients).
  Modules: ``sv_before_optimizer_step(optimizer)``.
* ``after_parameters_changed(chunks, optimizer)``: the parameters were written (optimizer step,
  checkpoint load, conversion). Writes through ``.data`` or a parameter all-gather do not bump a
  tensor's ``_version``, so caches derived from parameters (a folded weight, an FP8 weight) must key on
  ``parameters_generation()`` instead. Weights a load overwrote are folded again from the masters.
  Modules: ``sv_after_parameters_changed(optimizer)``.
* ``checkpoint_tensors(chunks, optimizer)``: {id(model parameter): tensor to save in its place}, so that
  checkpoints hold W and the vectors, never a folded W_eff (collective).

What training needs to know about the method besides these points is here too: the optimizer's
parameter-group overrides (weight decay per vector), the fold policy, and the reports (parameter groups,
fold plans, per-vector statistics).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from .config import ScaleVectorConfig
from .generation import bump, parameters_generation  # noqa: F401  (parameters_generation: public API)
from .param_groups import format_param_group_table, param_group_table, scale_vector_config_overrides
from .stats import parameter_report, scale_vector_statistics
from .step_fold import FOLD_COST_PER_TOKEN, FoldPolicy, StepFolder, attach

_FOLDER_ATTR = "sv_step_folder"  # the StepFolder lives on the optimizer it wraps


def _modules_with(chunks: Iterable[torch.nn.Module], method: str):
    for chunk in chunks:
        for module in chunk.modules():
            fn = getattr(module, method, None)
            if callable(fn):
                yield fn


def _folder(optimizer) -> Optional[StepFolder]:
    return getattr(optimizer, _FOLDER_ATTR, None) if optimizer is not None else None


def optimizer_ready(chunks, optimizer, policy: FoldPolicy = FoldPolicy()) -> StepFolder:
    folder = attach(chunks, optimizer, policy)
    setattr(optimizer, _FOLDER_ATTR, folder)
    return folder


def gradients_ready(chunks) -> None:
    for fn in _modules_with(chunks, "sv_gradients_ready"):
        fn()


def before_optimizer_step(chunks, optimizer=None) -> None:
    folder = _folder(optimizer)
    if folder is not None:
        folder.apply_chain_rule()
    for fn in _modules_with(chunks, "sv_before_optimizer_step"):
        fn(optimizer)


def after_parameters_changed(chunks, optimizer: Optional[object] = None) -> None:
    bump()
    folder = _folder(optimizer)
    if folder is not None:
        folder.check_no_pending()
        folder.refold_where_needed()
    for fn in _modules_with(chunks, "sv_after_parameters_changed"):
        fn(optimizer)


def checkpoint_tensors(chunks, optimizer=None) -> Dict[int, torch.Tensor]:
    folder = _folder(optimizer)
    return folder.checkpoint_tensors() if folder is not None else {}


def wrap_finalize(finalize_fn, chunks):
    """A ``config.finalize_model_grads_func`` that runs ``gradients_ready`` before the reduction."""

    def finalize_after_gradients_ready(*args, **kwargs):
        gradients_ready(chunks)
        return finalize_fn(*args, **kwargs)

    return finalize_after_gradients_ready


# ---------------------------------------------------------------------------------------------------- setup
def optimizer_overrides(sv: ScaleVectorConfig):
    """``get_megatron_optimizer(config_overrides=...)``: the scale vectors' weight-decay groups."""
    return scale_vector_config_overrides(sv)


def fold_policy(
    fold_once_per_step: bool, tokens_per_micro_batch: int, micro_batches_per_step: int, device_type: str
) -> FoldPolicy:
    """--sv-fold-once-per-step caches every fp32 fold; otherwise a cost model for this device chooses."""
    return FoldPolicy(
        mode="step" if fold_once_per_step else "auto",
        tokens_per_micro_batch=tokens_per_micro_batch,
        micro_batches_per_step=micro_batches_per_step,
        fold_cost_per_token=FOLD_COST_PER_TOKEN.get(device_type, FOLD_COST_PER_TOKEN["cuda"]),
    )


# ---------------------------------------------------------------------------------------------------- reports
_PLAN_NAMES = {
    "master": "folded at the master->model copy once per step",
    "cached": "cached fold once per step",
    "micro_batch": "folded per micro-batch",
}


def describe_folds(optimizer) -> str:
    """Where the folded linears fold, e.g. "4 cached fold once per step" ("none" without folded linears)."""
    folder = _folder(optimizer)
    plans = folder.plans() if folder is not None else {}
    return ", ".join(f"{n} {_PLAN_NAMES[k]}" for k, n in sorted(plans.items())) or "none"


def describe_parameters(sv: ScaleVectorConfig, chunks, weight_decay: float) -> str:
    """The parameter groups (weight decay per kind) and the parameter counts of this rank's shard."""
    rows = param_group_table(sv, chunks, weight_decay)
    return (
        "parameter groups (rank 0's shard):\n"
        + format_param_group_table(rows)
        + "\n"
        + str(parameter_report(chunks))
        + " (rank 0's shard)"
    )


def vector_statistics(chunks) -> Dict[str, float]:
    """Per-vector statistics of this rank's vectors, keyed "layer<i>/<vector>/<stat>" (local layer numbers)."""
    return scale_vector_statistics(chunks)
