"""Device/backend selection, distributed initialization, the CPU adapter and SDPA attention."""

from megatron_sv._lazy import lazy_exports

_EXPORTS = {
    "current_device": "device",
    "select_backend": "device",
    "using_cpu": "device",
    "destroy_distributed": "distributed",
    "initialize_distributed": "distributed",
    "read_launch_env": "distributed",
    "set_seed": "distributed",
    "validate_parallel_sizes": "parallel_sizes",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
