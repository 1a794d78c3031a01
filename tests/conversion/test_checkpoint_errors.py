"""Broken files and a full disk end with one line naming the file (or the cause), never a traceback,
and nothing saved earlier is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from megatron_sv.checkpointing import CheckpointError, read_tracker
from megatron_sv.conversion import ConversionError, import_from_hf
from tests.conversion.helpers import tiny_hf

QUIET = dict(log=lambda *a, **k: None)


def _model(source):
    from megatron_sv.checkpointing.model_io import read_checkpoint_args, shape_from_args, sv_config_from_args
    from megatron_sv.conversion import megatron_model as M

    _, args = read_checkpoint_args(source)
    model = M.build_model(shape_from_args(args), sv_config_from_args(args))
    state = M.load_model_checkpoint(source, model)
    return model, state


def test_truncated_shard_names_the_file(source, tmp_path):
    from megatron_sv.checkpointing.model_io import read_checkpoint_args

    root = str(tmp_path / "ck")
    shutil.copytree(source, root)
    ckpt = os.path.join(root, f"iter_{read_tracker(root):07d}")
    shard = max((os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".distcp")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match=f"{os.path.basename(shard)} is truncated or missing"):
        read_checkpoint_args(root)


def test_tracker_with_invalid_utf8_names_the_file(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe1\x00")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt: not a text file"):
        read_tracker(str(tmp_path))


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598"),
    ],
)
def test_full_disk_during_save_keeps_the_previous_checkpoint(source, tmp_path, monkeypatch, failure):
    """The checkpoint writer fails as on a full disk (its forked workers inherit the patched write)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_sv.conversion import megatron_model as M

    model, state = _model(source)
    root = str(tmp_path / "ck")
    M.save_model_checkpoint(root, 1, model, {"args": state["args"]})

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)
    with pytest.raises(CheckpointError) as e:
        M.save_model_checkpoint(root, 2, model, {"args": state["args"]})
    message = str(e.value)
    assert "saving iteration 2" in message and "the disk is full" in message, message
    assert "previous checkpoint (iteration 1) is kept" in message and "\n" not in message
    monkeypatch.undo()
    assert read_tracker(root) == 1 and not os.path.exists(os.path.join(root, "iter_0000002"))
    M.load_model_checkpoint(root, model)


@pytest.fixture
def hf_dir(tmp_path):
    path = str(tmp_path / "hf")
    tiny_hf("llama", path, vocab=100)
    return path


@pytest.mark.parametrize(
    "content,message",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), (None, "missing key 'hidden_size'")],
)
def test_bad_config_json_names_the_file(hf_dir, tmp_path, content, message):
    cfg = os.path.join(hf_dir, "config.json")
    if content is None:
        c = json.load(open(cfg))
        del c["hidden_size"]
        content = json.dumps(c)
    with open(cfg, "w") as f:
        f.write(content)
    with pytest.raises(ConversionError, match=f"config.json: {message}"):
        import_from_hf(hf_dir, str(tmp_path / "out"), strategy="hg", seq_length=16, **QUIET)


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path):
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ConversionError, match="model.safetensors: not a readable safetensors file"):
        import_from_hf(hf_dir, str(tmp_path / "out"), strategy="hg", seq_length=16, **QUIET)


def test_non_finite_hf_weights_are_refused_naming_the_tensor(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight has non-finite"):
        import_from_hf(hf_dir, str(tmp_path / "out"), strategy="hg", seq_length=16, **QUIET)
    assert not os.path.exists(tmp_path / "out")
    assert torch.isnan(load_file(path)["model.layers.1.mlp.down_proj.weight"]).any()
