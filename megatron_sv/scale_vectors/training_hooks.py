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
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from .generation import bump, parameters_generation  # noqa: F401  (parameters_generation: public API)
from .step_fold import FoldPolicy, StepFolder, attach

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
