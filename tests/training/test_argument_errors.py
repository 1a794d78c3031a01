"""Values that argparse accepts but training cannot use fail at start-up with one line naming the flag
(they used to raise deep inside Megatron-Core, or were silently accepted: --clip-grad nan turned
clipping off, --exit-interval 0/-1 never exited)."""

from __future__ import annotations

import pytest

from megatron_sv.training.arguments import ArgumentError, parse_args, validate_args
from tests.training.cli import TINY


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--global-batch-size", "0", "--global-batch-size must be positive, got 0"),
        ("--lr", "nan", "--lr must be a finite number, got nan"),
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--min-lr", "nan", "--min-lr must be a finite number"),
        ("--clip-grad", "nan", "--clip-grad must be a finite number"),
        ("--weight-decay", "nan", "--weight-decay must be a finite number"),
        ("--lr-decay-iters", "0", "--lr-decay-iters must be positive, got 0"),
        ("--exit-interval", "0", "--exit-interval must be positive, got 0"),
        ("--exit-interval", "-1", "--exit-interval must be positive, got -1"),
    ],
)
def test_unusable_values_name_the_flag(flag, value, message):
    with pytest.raises(ArgumentError) as e:
        validate_args(parse_args([*TINY, "--train-iters", "4", flag, value]), world_size=1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_incomplete_first_save_does_not_block_the_rerun(tmp_path, capsys):
    """A save killed before its metadata was written leaves iter_0000010 without a tracker: the same
    command (--load = --save) starts over with one warning (it used to be refused); a complete
    checkpoint without a tracker is still refused, naming what to do."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "iter_0000010" / "__0_0.distcp").write_bytes(b"partial")
    args = [*TINY, "--train-iters", "4", "--save", str(ckpt), "--load", str(ckpt)]
    validate_args(parse_args(args), world_size=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring incomplete checkpoint directories [10]" in err[0], err
    (ckpt / "iter_0000010" / "metadata.json").write_text("{}")
    with pytest.raises(ArgumentError, match="found complete iteration directories \\[10\\]"):
        validate_args(parse_args(args), world_size=1)


def test_unwritable_save_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="--save .* is not a directory"):
        validate_args(parse_args([*TINY, "--train-iters", "4", "--save", str(tmp_path / "file" / "ck")]), world_size=1)
