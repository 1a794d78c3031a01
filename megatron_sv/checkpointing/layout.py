"""Checkpoint directory layout: ``SAVE/iter_0000010/`` (one dist-checkpoint per iteration) and
``SAVE/latest_checkpointed_iteration.txt`` (the tracker), written by atomic rename only after every
rank finished writing that iteration. A crash mid-save therefore leaves the tracker on the last
complete checkpoint; the incomplete directory it leaves is ignored (with a warning) and replaced by the
next save of that iteration."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, List, Optional

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
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a text file (invalid UTF-8); expected an iteration number") from None
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None
    if iteration < 0:
        raise CheckpointError(f"{path}: negative iteration {iteration}")
    ckpt = checkpoint_dir(root, iteration)
    if not os.path.isfile(os.path.join(ckpt, METADATA_FILENAME)):
        raise CheckpointError(
            f"{path} names iteration {iteration}, but {ckpt} is missing or incomplete (no {METADATA_FILENAME})"
        )
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


def is_complete(root: str, iteration: int) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir(root, iteration), METADATA_FILENAME))


def remove_incomplete_before(root: str, iteration: int) -> None:
    """Delete the leftovers of saves that never finished, older than the checkpoint just completed
    (saves run in increasing iteration order, so none of them can still be in progress)."""
    for i in list_iterations(root):
        if i < iteration and not is_complete(root, i):
            shutil.rmtree(checkpoint_dir(root, i), ignore_errors=True)


def check_load_dir(
    load: str, allow_empty: bool = False, warn: Callable[[str], None] = lambda msg: None
) -> Optional[int]:
    """Validate ``--load``: it must hold a valid tracker, unless ``allow_empty`` (``--load`` equals
    ``--save``: the auto-resume pattern of requeued jobs) and the directory holds no complete
    checkpoint yet. Iteration directories that were never completed (a save killed or failed before
    the tracker named it) are ignored with a warning: the next save of that iteration replaces them."""
    if not os.path.exists(load):
        if allow_empty:
            return None
        raise CheckpointError(f"--load {load!r} does not exist")
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load!r} is not a directory")
    iteration = read_tracker(load)
    found = list_iterations(load)
    incomplete = [i for i in found if (iteration is None or i > iteration) and not is_complete(load, i)]
    if incomplete:
        warn(
            f"warning: ignoring incomplete checkpoint directories {incomplete[:5]} in {load} (a save that "
            f"did not finish); the next save of that iteration replaces them"
        )
    if iteration is None:
        complete = [i for i in found if is_complete(load, i)]
        if allow_empty and not complete:
            return None
        raise CheckpointError(
            f"--load {load!r} has no {TRACKER_FILENAME}"
            + (
                f" (found complete iteration directories {complete[:5]}: write the one to resume into "
                f"{tracker_path(load)})"
                if complete
                else f" (found only incomplete iteration directories {found[:5]})"
                if found
                else " (not a megatron_sv checkpoint directory)"
            )
        )
    return iteration


def check_writable_dir(path: str, flag: str = "--save") -> None:
    """``path`` (a directory, existing or to be created) can be written: probe with a temporary file
    in it or in its nearest existing parent (permission bits do not tell for root or read-only mounts)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CheckpointError(f"{flag} {path!r}: {probe} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".megatron_sv_write_test"):
            pass
    except OSError as e:
        raise CheckpointError(f"{flag} {path!r} is not writable ({probe}: {e.strerror})") from None


def check_free_space(path: str, need_bytes: int, warn: Callable[[str], None]) -> None:
    """Warn when the file system of ``path`` has room for fewer than two checkpoints of about
    ``need_bytes``: a save that fills the disk fails (the previous checkpoint is kept)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < 2 * need_bytes:
        warn(
            f"warning: --save {path!r} has {free / 2**30:.2f} GiB free, room for fewer than two "
            f"checkpoints of about {need_bytes / 2**30:.2f} GiB each"
        )


def check_save_dir(save: str, load: Optional[str]) -> None:
    """Refuse a ``--save`` directory that already holds another run's checkpoints: saving there is only
    allowed when the run continues from it (``--load`` is the same directory)."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"--save {save!r} exists and is not a directory")
    check_writable_dir(save)
    existing = list_iterations(save)
    has_tracker = os.path.isfile(tracker_path(save))
    if (existing or has_tracker) and (load is None or os.path.abspath(load) != os.path.abspath(save)):
        raise CheckpointError(
            f"--save {save!r} already holds checkpoints of another run (iterations {existing[:5]}); "
            f"pass --load {save} to continue that run, or choose an empty directory"
        )
