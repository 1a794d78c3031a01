"""Checkpoint directory layout: ``SAVE/iter_0000010/`` (one dist-checkpoint per iteration) and
``SAVE/latest_checkpointed_iteration.txt`` (the tracker), written by atomic rename only after every
rank finished writing that iteration. A crash mid-save therefore leaves the tracker on the last
complete checkpoint."""

from __future__ import annotations

import os
from typing import List, Optional

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "metadata.json"  # written by dist_checkpointing in every complete checkpoint


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tracker_path(root: str) -> str:
    return os.path.join(root, TRACKER_FILENAME)


def read_tracker(root: str) -> Optional[int]:
    """The iteration the tracker names, or None when there is no tracker. Raises CheckpointError for a
    malformed tracker or one naming a missing/incomplete checkpoint."""
    path = tracker_path(root)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None
    if iteration < 0:
        raise CheckpointError(f"{path}: negative iteration {iteration}")
    ckpt = checkpoint_dir(root, iteration)
    if not os.path.isfile(os.path.join(ckpt, METADATA_FILENAME)):
        raise CheckpointError(f"{path} names iteration {iteration}, but {ckpt} is missing or incomplete "
                              f"(no {METADATA_FILENAME})")
    return iteration


def write_tracker(root: str, iteration: int) -> None:
    path = tracker_path(root)
    tmp = path + f".tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_iterations(root: str) -> List[int]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit():
            out.append(int(name[5:]))
    return sorted(out)


def check_load_dir(load: str, allow_empty: bool = False) -> Optional[int]:
    """Validate ``--load``: it must hold a valid tracker, unless ``allow_empty`` (``--load`` equals
    ``--save``: the auto-resume pattern of requeued jobs) and the directory holds no checkpoint yet."""
    if not os.path.exists(load):
        if allow_empty:
            return None
        raise CheckpointError(f"--load {load!r} does not exist")
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load!r} is not a directory")
    iteration = read_tracker(load)
    if iteration is None:
        if allow_empty and not list_iterations(load):
            return None
        found = list_iterations(load)
        raise CheckpointError(
            f"--load {load!r} has no {TRACKER_FILENAME}"
            + (f" (found iteration directories {found[:5]}, but none was completed)" if found else
               " (not a megatron_sv checkpoint directory)"))
    return iteration


def check_save_dir(save: str, load: Optional[str]) -> None:
    """Refuse a ``--save`` directory that already holds another run's checkpoints: saving there is only
    allowed when the run continues from it (``--load`` is the same directory)."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"--save {save!r} exists and is not a directory")
    existing = list_iterations(save)
    has_tracker = os.path.isfile(tracker_path(save))
    if (existing or has_tracker) and (load is None or os.path.abspath(load) != os.path.abspath(save)):
        raise CheckpointError(
            f"--save {save!r} already holds checkpoints of another run (iterations {existing[:5]}); "
            f"pass --load {save} to continue that run, or choose an empty directory")
