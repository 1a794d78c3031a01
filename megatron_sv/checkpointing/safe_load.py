"""Check a checkpoint's pickled files before anything else reads them: loading never runs code.

Three kinds of file in a dist-checkpoint are pickles:
  .metadata            torch.distributed.checkpoint's index, read by torch with plain ``pickle.load``
  byte items in *.distcp  non-tensor values (e.g. ``_extra_state``), read by torch's default load
                       planner with ``torch.load(weights_only=False)``
  common.pt, rng/*.pt  plain state, read with ``torch.load`` (weights_only by default since torch 2.6)
Any of them can carry a payload that runs when unpickled. Megatron-Core creates torch's reader and
planner inside its load strategy, so instead of replacing them we check every such file first, with an
allowlist: the metadata with a restricted unpickler (only torch.distributed.checkpoint's metadata
classes, torch dtypes/sizes and plain containers), the byte items and .pt files with
``torch.load(weights_only=True)``. A pickle that passes the restricted unpickler can only rebuild
allowlisted objects, so reading the same bytes again unrestricted is harmless.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import io
import os
import pickle
from typing import Any, Dict

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_sv.checkpointing.layout import CheckpointError

METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
PLAIN_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file would need code outside the allowlist to be unpickled."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PLAIN_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in METADATA_MODULES:
            obj = super().find_class(module, name)
            # data classes and enums only: no functions, nothing with custom reconstruction code
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to unpickle {module}.{name}, which is not a checkpoint metadata class "
            f"(a crafted file could run code)"
        )


def read_dcp_metadata(ckpt: str):
    """torch.distributed.checkpoint's ``.metadata`` of ``ckpt``, unpickled with the allowlist."""
    path = os.path.join(ckpt, ".metadata")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, path).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt} is not a complete checkpoint") from None
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbage: one line naming the file
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from None


def load_weights_only(path: str, data: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (or of ``data``, bytes read from it), with one line
    naming the file when it is refused or unreadable."""
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise UnsafeCheckpointError(f"{path}: refused by torch.load(weights_only=True): {first[:200]}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}); the file is truncated or corrupt"
        ) from None


def verify_checkpoint_files(ckpt: str) -> Dict[str, Any]:
    """Check every pickled file of the dist-checkpoint ``ckpt`` and that the tensor files are as long as
    the metadata says. Returns the common state (common.pt). Raises CheckpointError naming the file."""
    metadata = read_dcp_metadata(ckpt)
    storage = getattr(metadata, "storage_data", None) or {}
    sizes: Dict[str, int] = {}
    for index, info in storage.items():
        path = os.path.join(ckpt, info.relative_path)
        if path not in sizes:
            sizes[path] = os.path.getsize(path) if os.path.isfile(path) else -1
        if sizes[path] < info.offset + info.length:
            raise CheckpointError(
                f"{path} is truncated or missing: {max(sizes[path], 0)} bytes, the metadata needs "
                f"{info.offset + info.length}"
            )
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{path}: item {index.fqn} is stored with transforms "
                    f"{info.transform_descriptors}, which this loader does not check"
                )
            with open(path, "rb") as f:
                f.seek(info.offset)
                load_weights_only(path, f.read(info.length))
    for path in sorted(glob.glob(os.path.join(ckpt, "rng", "*.pt"))):
        load_weights_only(path)
    return load_weights_only(os.path.join(ckpt, "common.pt"))
