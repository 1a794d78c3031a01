"""Loading a crafted checkpoint never runs code. Each kind of pickled file of a real checkpoint gets a
payload that writes a marker file when unpickled: torch's own reader would run it (checked once, for
the metadata and the byte items), our loader refuses it with one line naming the file, in-process and
through tools/convert_checkpoint.py export."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_sv.checkpointing import checkpoint_dir, read_tracker
from megatron_sv.checkpointing.safe_load import UnsafeCheckpointError
from tests.training.cli import ROOT, env


class Payload:
    """Unpickling this creates the file ``path`` (a stand-in for any code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _copy(source, tmp_path):
    root = str(tmp_path / "crafted")
    shutil.copytree(source, root)
    return root, checkpoint_dir(root, read_tracker(root))


def _metadata(ckpt):
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        return pickle.load(f)  # our own, trusted copy


def _write_metadata(ckpt, metadata):
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def _crafted_metadata(ckpt, marker):
    metadata = _metadata(ckpt)
    metadata.planner_data = {"x": Payload(marker)}
    _write_metadata(ckpt, metadata)


def _crafted_byte_item(ckpt, marker):
    """Point one non-tensor item (an ``_extra_state``) at a torch.save'd payload."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = _metadata(ckpt)
    index, info = next(
        (i, s)
        for i, s in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    path = os.path.join(ckpt, info.relative_path)
    info.offset, info.length = os.path.getsize(path), len(buf.getvalue())
    with open(path, "ab") as f:
        f.write(buf.getvalue())
    _write_metadata(ckpt, metadata)
    return path


def _crafted_common(ckpt, marker):
    common = torch.load(os.path.join(ckpt, "common.pt"), weights_only=True)
    common["args"]["hidden_size"] = Payload(marker)
    torch.save(common, os.path.join(ckpt, "common.pt"))


def _crafted_rng(ckpt, marker):
    os.makedirs(os.path.join(ckpt, "rng"), exist_ok=True)
    torch.save({"torch_cpu": Payload(marker)}, os.path.join(ckpt, "rng", "rank_00000.pt"))


CRAFTS = {
    "metadata": (_crafted_metadata, ".metadata"),
    "byte_item": (_crafted_byte_item, ".distcp"),
    "common": (_crafted_common, "common.pt"),
    "rng": (_crafted_rng, "rank_00000.pt"),
}


@pytest.mark.parametrize("kind", sorted(CRAFTS))
def test_payload_is_refused_naming_the_file(source, tmp_path, kind):
    from megatron_sv.checkpointing.model_io import read_checkpoint_args, shape_from_args, sv_config_from_args
    from megatron_sv.conversion import megatron_model as M

    _, args = read_checkpoint_args(source)
    root, ckpt = _copy(source, tmp_path)
    marker = str(tmp_path / "marker")
    craft, filename = CRAFTS[kind]
    craft(ckpt, marker)
    with pytest.raises(UnsafeCheckpointError, match=filename.replace(".", r"\.")) as e:
        read_checkpoint_args(root)  # what the tools read first
    assert "\n" not in str(e.value)
    model = M.build_model(shape_from_args(args), sv_config_from_args(args))
    with pytest.raises(UnsafeCheckpointError, match=filename.replace(".", r"\.")):
        M.load_model_checkpoint(root, model)  # the loader training uses too
    assert not os.path.exists(marker)


def test_the_payloads_are_live_for_torch_own_reader(source, tmp_path):
    """The check above is not vacuous: torch's reader runs the metadata and byte-item payloads."""
    from torch.distributed.checkpoint import FileSystemReader

    root, ckpt = _copy(source, tmp_path)
    marker = str(tmp_path / "marker_metadata")
    _crafted_metadata(ckpt, marker)
    FileSystemReader(ckpt).read_metadata()
    assert os.path.exists(marker)
    root, ckpt = _copy(source, tmp_path / "b")
    marker = str(tmp_path / "marker_item")
    path = _crafted_byte_item(ckpt, marker)
    info = next(
        s
        for s in _metadata(ckpt).storage_data.values()
        if s.relative_path == os.path.basename(path) and s.offset + s.length == os.path.getsize(path)
    )
    with open(path, "rb") as f:
        f.seek(info.offset)
        torch.load(io.BytesIO(f.read(info.length)), weights_only=False)  # what torch's load planner does
    assert os.path.exists(marker)


def test_export_tool_refuses(source, tmp_path):
    root, ckpt = _copy(source, tmp_path)
    marker = str(tmp_path / "marker")
    _crafted_metadata(ckpt, marker)
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_checkpoint.py"),
            "export",
            "--load",
            root,
            "--save",
            str(tmp_path / "hf_out"),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and not os.path.exists(marker)
    assert ".metadata: refusing to unpickle" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
