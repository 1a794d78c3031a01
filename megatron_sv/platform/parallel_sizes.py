"""The parallel layout's arithmetic: does TP x PP x CP (and the expert layout) fit the world size?

Its own module without torch, because the command-line validation uses it before anything heavy is
imported (a bad layout fails in a fraction of a second, not after megatron.core has loaded)."""

from __future__ import annotations

from typing import Optional


def validate_parallel_sizes(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
) -> int:
    """Check the layout fits the world; return the data-parallel size. Raises ValueError."""
    for name, v in [
        ("tensor_model_parallel_size", tensor_model_parallel_size),
        ("pipeline_model_parallel_size", pipeline_model_parallel_size),
        ("expert_model_parallel_size", expert_model_parallel_size),
        ("context_parallel_size", context_parallel_size),
    ]:
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    model = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tensor_model_parallel_size}) x "
            f"pipeline ({pipeline_model_parallel_size}) x context ({context_parallel_size}) "
            f"parallel sizes = {model}"
        )
    dp = world_size // model
    etp = tensor_model_parallel_size if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    expert_model = etp * expert_model_parallel_size * pipeline_model_parallel_size
    if world_size % expert_model != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by expert tensor ({etp}) x expert "
            f"({expert_model_parallel_size}) x pipeline ({pipeline_model_parallel_size}) "
            f"parallel sizes = {expert_model}"
        )
    return dp
