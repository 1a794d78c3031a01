"""The one interface between a training loop and the scale-vector method.

Training code never reaches into the method's modules; it calls these three functions at fixed points
of a step, and every module that needs to act at that point implements the matching method:

* ``gradients_ready(chunks)``: all micro-batches' backward passes are done, gradients are not yet
  reduced over data-parallel ranks (Megatron's ``finalize_model_grads``). Modules: ``sv_gradients_ready()``.
* ``before_optimizer_step(chunks, optimizer)``: gradients are reduced, the optimizer is about to read
  them. Modules: ``sv_before_optimizer_step(optimizer)``.
* ``after_parameters_changed(chunks, optimizer)``: the parameters were written (optimizer step,
  checkpoint load, conversion). Writes through ``.data`` or a parameter all-gather do not bump a
  tensor's ``_version``, so caches derived from parameters (a folded weight, an FP8 weight) must key on
  ``parameters_generation()`` instead. Modules: ``sv_after_parameters_changed(optimizer)``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

_generation = 0


def parameters_generation() -> int:
    """A counter bumped by every ``after_parameters_changed``: the key for parameter-derived caches."""
    return _generation


def _modules_with(chunks: Iterable[torch.nn.Module], method: str):
    for chunk in chunks:
        for module in chunk.modules():
            fn = getattr(module, method, None)
            if callable(fn):
                yield fn


def gradients_ready(chunks) -> None:
    for fn in _modules_with(chunks, "sv_gradients_ready"):
        fn()


def before_optimizer_step(chunks, optimizer=None) -> None:
    for fn in _modules_with(chunks, "sv_before_optimizer_step"):
        fn(optimizer)


def after_parameters_changed(chunks, optimizer: Optional[object] = None) -> None:
    global _generation
    _generation += 1
    for fn in _modules_with(chunks, "sv_after_parameters_changed"):
        fn(optimizer)


def wrap_finalize(finalize_fn, chunks):
    """A ``config.finalize_model_grads_func`` that runs ``gradients_ready`` before the reduction."""

    def finalize_after_gradients_ready(*args, **kwargs):
        gradients_ready(chunks)
        return finalize_fn(*args, **kwargs)

    return finalize_after_gradients_ready
