"""Distributed checkpoints (Megatron-Core dist_checkpointing, torch_dist format): directory layout,
tracker file, save/load of model, optimizer, scheduler, RNG and training progress. Shared by the
training entry point and the tools."""

from megatron_sv._lazy import lazy_exports

_EXPORTS = {
    "TRACKER_FILENAME": "layout",
    "CheckpointError": "layout",
    "check_load_dir": "layout",
    "check_save_dir": "layout",
    "checkpoint_dir": "layout",
    "read_tracker": "layout",
    "write_tracker": "layout",
    "load_checkpoint": "dist",
    "save_checkpoint": "dist",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
