"""Values that argparse accepts but training cannot use fail at start-up with one line naming the flag
(they used to raise deep inside Megatron-Core, or were silently accepted: --clip-grad nan turned
clipping off, --exit-interval 0/-1 never exited)."""

from __future__ import annotations

import pytest

from megatron_sv.training.arguments import ArgumentError, parse_args, validate_args
from tests.training.cli import TINY


@pytest.mark.parametrize("flag,value,message", [
    ("--global-batch-size", "0", "--global-batch-size must be positive, got 0"),
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--min-lr", "nan", "--min-lr must be a finite number"),
    ("--clip-grad", "nan", "--clip-grad must be a finite number"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number"),
    ("--lr-decay-iters", "0", "--lr-decay-iters must be positive, got 0"),
    ("--exit-interval", "0", "--exit-interval must be positive, got 0"),
    ("--exit-interval", "-1", "--exit-interval must be positive, got -1"),
])
def test_unusable_values_name_the_flag(flag, value, message):
    with pytest.raises(ArgumentError) as e:
        validate_args(parse_args([*TINY, "--train-iters", "4", flag, value]), world_size=1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
