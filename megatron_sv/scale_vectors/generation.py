"""A counter of parameter changes: the key for caches derived from parameters.

Writes through ``.data`` or a parameter all-gather do not bump a tensor's ``_version``, so a cache (a
folded weight, an FP8 weight) cannot tell from the tensor that it is stale. ``training_hooks.
after_parameters_changed`` bumps this counter whenever the training loop changed parameters (optimizer
step, checkpoint load); a cache built at generation g is valid while ``parameters_generation() == g``.
"""

from __future__ import annotations

_generation = 0


def parameters_generation() -> int:
    return _generation


def bump() -> int:
    global _generation
    _generation += 1
    return _generation
