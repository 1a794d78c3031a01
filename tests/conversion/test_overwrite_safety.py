"""--overwrite never deletes what the converter did not write. It used to replace the output directory
wholesale: ``export --load proj/ck --save proj --overwrite`` deleted proj, the source included."""

from __future__ import annotations

import os
import shutil

import pytest

from megatron_sv.checkpointing import read_tracker
from megatron_sv.conversion import ConversionError, convert_megatron, export_to_hf

QUIET = dict(log=lambda *a, **k: None)


def _project(source, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(source, proj / "ck")
    (proj / "notes.txt").write_text("mine")
    return str(proj), str(proj / "ck")


@pytest.mark.parametrize("target", ["parent", "same", "inside"])
def test_output_overlapping_the_input_is_refused(source, tmp_path, target):
    proj, ck = _project(source, tmp_path)
    out = {"parent": proj, "same": ck, "inside": os.path.join(ck, "hf")}[target]
    with pytest.raises(ConversionError, match="overlaps the input"):
        export_to_hf(ck, out, overwrite=True, **QUIET)
    with pytest.raises(ConversionError, match="overlaps the input"):
        convert_megatron(ck, out, overwrite=True, **QUIET)
    assert read_tracker(ck) is not None and open(os.path.join(proj, "notes.txt")).read() == "mine"


def test_overwrite_replaces_only_an_earlier_output(source, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    with pytest.raises(ConversionError, match="not one"):
        export_to_hf(source, str(other), overwrite=True, **QUIET)
    assert (other / "keep.txt").read_text() == "not ours"
    out = str(tmp_path / "hf")
    export_to_hf(source, out, **QUIET)
    (tmp_path / "hf" / "stale.txt").write_text("from the earlier export")
    export_to_hf(source, out, overwrite=True, **QUIET)  # an earlier output of the tool: replaced
    assert not os.path.exists(os.path.join(out, "stale.txt")) and os.path.isfile(os.path.join(out, "config.json"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".convert")]  # no staging left behind
