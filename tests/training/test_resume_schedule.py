"""Resuming with a different LR schedule: refused with every differing value named, unless
--override-opt_param-scheduler (command line wins) or --use-checkpoint-opt_param-scheduler (checkpoint wins)."""

from __future__ import annotations

import math

import pytest

from megatron_sv.checkpointing import read_tracker
from tests.training.cli import TINY, check, read_metrics, run

LR, MIN_LR = 3e-3, 3e-4  # TINY's cosine schedule


def _cosine(step: int, decay_steps: int) -> float:
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * step / decay_steps))


def test_changed_schedule_refused_unless_a_flag_says_which_wins(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    check(run([*TINY, "--train-iters", "2", "--save", ckpt], nproc=1))
    assert read_tracker(ckpt) == 2
    resume = [*TINY, "--train-iters", "4", "--load", ckpt]

    r = run([*resume, "--metrics-file", str(tmp_path / "refused.jsonl")], nproc=1)
    assert r.returncode == 2, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if "checkpoint error" in x]
    assert len(line) == 1, r.stderr[-3000:]
    assert "lr_decay_steps: checkpoint 2, now 4" in line[0]
    assert "--override-opt_param-scheduler" in line[0] and "--use-checkpoint-opt_param-scheduler" in line[0]
    assert not read_metrics(str(tmp_path / "refused.jsonl"))  # no step was taken

    over = str(tmp_path / "override.jsonl")
    check(run([*resume, "--override-opt_param-scheduler", "--metrics-file", over], nproc=1))
    lrs = {i: rec["lr"] for i, rec in read_metrics(over).items()}
    assert sorted(lrs) == [3, 4]
    assert lrs[3] == pytest.approx(_cosine(2, 4), rel=1e-6) and lrs[4] == pytest.approx(_cosine(3, 4), rel=1e-6)

    kept = str(tmp_path / "checkpoint.jsonl")
    check(run([*resume, "--use-checkpoint-opt_param-scheduler", "--metrics-file", kept], nproc=1))
    lrs = {i: rec["lr"] for i, rec in read_metrics(kept).items()}
    assert lrs == {3: pytest.approx(MIN_LR), 4: pytest.approx(MIN_LR)}  # the checkpoint's schedule has ended
    assert read_tracker(ckpt) == 2
