"""Device/backend selection, distributed initialization, the CPU adapter and SDPA attention."""

from megatron_sv.platform.device import current_device, select_backend, using_cpu
from megatron_sv.platform.distributed import (
    destroy_distributed,
    initialize_distributed,
    read_launch_env,
    set_seed,
    validate_parallel_sizes,
)

__all__ = [
    "current_device", "select_backend", "using_cpu", "destroy_distributed",
    "initialize_distributed", "read_launch_env", "set_seed", "validate_parallel_sizes",
]
