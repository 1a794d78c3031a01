"""What a resume accepts, through the real CLI, from one saved checkpoint:

* a different LR schedule is refused with every differing value named, unless --override-opt_param-scheduler
  (command line wins) or --use-checkpoint-opt_param-scheduler (checkpoint wins);
* a different model- or method-defining flag is refused naming the checkpoint's and the current value;
* switching --use-distributed-optimizer is refused in one line before anything is loaded."""

from __future__ import annotations

import math

import pytest

from megatron_sv.checkpointing import read_tracker
from tests.training.cli import TINY, check, read_metrics, run, run_side_by_side

LR, MIN_LR = 3e-3, 3e-4  # TINY's cosine schedule


def _cosine(step: int, decay_steps: int) -> float:
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * step / decay_steps))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("resume") / "ckpt")
    check(run([*TINY, "--train-iters", "2", "--save", path], nproc=1))
    assert read_tracker(path) == 2
    return path


@pytest.fixture(scope="module")
def resumes(ckpt, tmp_path_factory):
    """Every resume of this module from ``ckpt``, side by side (none of them saves): name -> (result,
    metrics file)."""
    tmp = tmp_path_factory.mktemp("resumes")
    schedule = [*TINY, "--train-iters", "4", "--load", ckpt]
    runs = {
        "norm_epsilon": [*TINY, "--train-iters", "2", "--load", ckpt, "--norm-epsilon", "1e-6"],
        "distributed_optimizer": [*TINY, "--train-iters", "2", "--load", ckpt, "--use-distributed-optimizer"],
        "refused": schedule,
        "override": [*schedule, "--override-opt_param-scheduler"],
        "checkpoint": [*schedule, "--use-checkpoint-opt_param-scheduler"],
    }
    metrics = {name: str(tmp / f"{name}.jsonl") for name in runs}
    results = run_side_by_side(
        *(dict(args=[*args, "--metrics-file", metrics[name]], nproc=1) for name, args in runs.items())
    )
    return {name: (r, metrics[name]) for name, r in zip(runs, results)}


def _refused(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if "error" in x]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_changed_model_flag_is_refused_naming_both_values(resumes):
    line = _refused(resumes["norm_epsilon"][0])
    assert "--norm-epsilon: checkpoint 1e-05, now 1e-06" in line


def test_switching_the_distributed_optimizer_is_refused_in_one_line(resumes):
    line = _refused(resumes["distributed_optimizer"][0])
    assert "--use-distributed-optimizer: checkpoint False, now True" in line and "--no-load-optim" in line


def test_changed_schedule_refused_unless_a_flag_says_which_wins(resumes, ckpt):
    r, refused = resumes["refused"]
    assert r.returncode == 2, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if "checkpoint error" in x]
    assert len(line) == 1, r.stderr[-3000:]
    assert "lr_decay_steps: checkpoint 2, now 4" in line[0]
    assert "--override-opt_param-scheduler" in line[0] and "--use-checkpoint-opt_param-scheduler" in line[0]
    assert not read_metrics(refused)  # no step was taken

    r, over = resumes["override"]
    check(r)
    lrs = {i: rec["lr"] for i, rec in read_metrics(over).items()}
    assert sorted(lrs) == [3, 4]
    assert lrs[3] == pytest.approx(_cosine(2, 4), rel=1e-6) and lrs[4] == pytest.approx(_cosine(3, 4), rel=1e-6)

    r, kept = resumes["checkpoint"]
    check(r)
    lrs = {i: rec["lr"] for i, rec in read_metrics(kept).items()}
    assert lrs == {3: pytest.approx(MIN_LR), 4: pytest.approx(MIN_LR)}  # the checkpoint's schedule has ended
    assert read_tracker(ckpt) == 2
