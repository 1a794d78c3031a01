"""Distributed checkpoints (Megatron-Core dist_checkpointing, torch_dist format): directory layout,
tracker file, save/load of model, optimizer, scheduler, RNG and training progress. Shared by the
training entry point and the tools."""

from megatron_sv.checkpointing.layout import (
    TRACKER_FILENAME,
    CheckpointError,
    check_load_dir,
    check_save_dir,
    checkpoint_dir,
    read_tracker,
    write_tracker,
)
from megatron_sv.checkpointing.dist import load_checkpoint, save_checkpoint

__all__ = [
    "TRACKER_FILENAME", "CheckpointError", "check_load_dir", "check_save_dir", "checkpoint_dir",
    "read_tracker", "write_tracker", "load_checkpoint", "save_checkpoint",
]
