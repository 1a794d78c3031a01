"""End-to-end tests of pretrain_gpt_sv.py via torchrun with 2 gloo ranks on CPU."""

from __future__ import annotations

import os
import shutil

import pytest

from megatron_sv.checkpointing import read_tracker
from tests.training.cli import TINY, check, losses, read_metrics, run, run_side_by_side

ITERS = 4


def _side_by_side(*runs):
    """CLI runs at the same time, each a (args, nproc) pair; each must succeed."""
    return [check(r) for r in run_side_by_side(*(dict(args=args, nproc=nproc) for args, nproc in runs))]


def test_tp2_pp2_dp2_match_single_rank(tmp_path):
    layouts = {
        "tp1": ([], 1),
        "tp2": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),
        "pp2": (["--pipeline-model-parallel-size", "2"], 2),
        "dp2": (["--use-distributed-optimizer"], 2),
        "pp2_fold_once_per_step": (["--pipeline-model-parallel-size", "2", "--sv-fold-once-per-step"], 2),
    }
    metrics = {name: str(tmp_path / f"{name}.jsonl") for name in layouts}
    _side_by_side(
        *(
            ([*TINY, "--train-iters", str(ITERS), "--metrics-file", metrics[name], *layout], nproc)
            for name, (layout, nproc) in layouts.items()
        )
    )
    ref = losses(metrics["tp1"])
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert ref[ITERS] < ref[1]
    for name in list(layouts)[1:]:
        got = losses(metrics[name])
        assert sorted(got) == sorted(ref), name
        for i in ref:
            assert got[i] == pytest.approx(ref[i], rel=2e-5, abs=2e-5), (name, i, got[i], ref[i])


def test_resume_matches_uninterrupted_and_reshards(tmp_path):
    layout = ["--tensor-model-parallel-size", "2"]
    full = str(tmp_path / "full.jsonl")
    ckpt = str(tmp_path / "ckpt")
    part = str(tmp_path / "part.jsonl")
    args = [*TINY, *layout, "--train-iters", "6", "--save", ckpt, "--load", ckpt, "--metrics-file", part]
    _, out = _side_by_side(
        ([*TINY, *layout, "--train-iters", "6", "--metrics-file", full], 2), ([*args, "--exit-interval", "3"], 2)
    )
    full = losses(full)
    assert read_tracker(ckpt) == 3 and "exiting at iteration 3" in out.stdout
    shutil.copytree(ckpt, str(tmp_path / "ckpt_at_3"))
    # the rest of the run, and the TP2 checkpoint of iteration 3 resumed at PP2 (model and optimizer resharded)
    pp = str(tmp_path / "pp.jsonl")
    pp_args = ["--pipeline-model-parallel-size", "2", "--train-iters", "6", "--load", str(tmp_path / "ckpt_at_3")]
    _side_by_side((args, 2), ([*TINY, *pp_args, "--metrics-file", pp], 2))
    resumed = losses(part)
    assert sorted(resumed) == list(range(1, 7))
    for i in range(1, 7):
        assert resumed[i] == full[i], (i, resumed[i], full[i])  # bit-exact
    assert read_tracker(ckpt) == 6
    got = losses(pp)
    assert sorted(got) == [4, 5, 6]
    for i in got:
        assert got[i] == pytest.approx(full[i], rel=2e-5, abs=2e-5), (i, got[i], full[i])


def test_nan_stops_with_iteration_and_keeps_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r = run(
        [
            *TINY,
            "--train-iters",
            "6",
            "--save",
            ckpt,
            "--save-interval",
            "2",
            "--inject-nan-at-iteration",
            "3",
            "--metrics-file",
            str(tmp_path / "m.jsonl"),
        ]
    )
    assert r.returncode != 0, r.stderr[-3000:]  # torchrun exits 1 when ranks exit 3
    assert "iteration 3" in r.stderr and "nan" in r.stderr.lower()
    assert read_tracker(ckpt) == 2
    assert not os.path.exists(os.path.join(ckpt, "iter_0000003"))


def test_validation_tensorboard_and_wandb(tmp_path):
    tb, wb = tmp_path / "tb", str(tmp_path / "wandb")
    metrics = str(tmp_path / "m.jsonl")
    r = check(
        run(
            [x for x in TINY if x not in ("--no-scale-vector-stats",)]
            + [
                "--train-iters",
                "4",
                "--eval-interval",
                "2",
                "--eval-iters",
                "1",
                "--log-interval",
                "2",
                "--tensorboard-dir",
                str(tb),
                "--metrics-file",
                metrics,
                "--wandb-project",
                "sv-test",
                "--wandb-exp-name",
                "e2e",
                "--wandb-save-dir",
                wb,
                "--pipeline-model-parallel-size",
                "2",
            ],
            extra_env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        )
    )
    assert sorted(read_metrics(metrics, "valid")) == [2, 4]
    assert "validation at iteration 2" in r.stdout and "tokens/s" in r.stdout
    assert "scale vectors (Input-Norm)" in r.stdout  # the param-group table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "validation/loss"} <= tags
    # statistics from both pipeline stages, with global layer numbers
    assert any(t.startswith("scale_vectors/layer0/") for t in tags), sorted(tags)[:20]
    assert any(t.startswith("scale_vectors/layer1/") for t in tags), sorted(tags)[:20]
    # the same scalars in the offline wandb run, at the same iterations
    from tests.helpers.wandb_records import offline_runs, read_run

    runs = offline_runs(wb)
    assert len(runs) == 1, runs
    run_ = read_run(runs[0])
    assert run_["project"] == "sv-test" and run_["name"] == "e2e" and run_["config"]["train_iters"] == 4
    for tag in ("train/loss", "validation/loss"):
        tb_values = {e.step: e.value for e in acc.Scalars(tag)}
        wb_values = {step: row[tag] for step, row in run_["history"].items() if tag in row}
        assert wb_values.keys() == tb_values.keys() and tb_values, (tag, wb_values, tb_values)
        assert all(abs(wb_values[s] - tb_values[s]) <= 1e-6 * abs(tb_values[s]) for s in tb_values)  # TB: float32
    assert any(k.startswith("scale_vectors/layer1/") for k in run_["history"][4])


def test_distributed_optimizer_resume_and_reshard(tmp_path):
    """DP2 with the distributed optimizer: exact resume, and its checkpoint (fully_reshardable format)
    resumed on one rank (DP1) and at TP2 (model and optimizer state resharded)."""
    layout = ["--use-distributed-optimizer"]
    full = str(tmp_path / "full.jsonl")
    ckpt = str(tmp_path / "ckpt")
    part = str(tmp_path / "part.jsonl")
    args = [*TINY, *layout, "--train-iters", "5", "--save", ckpt, "--load", ckpt, "--metrics-file", part]
    _side_by_side(
        ([*TINY, *layout, "--train-iters", "5", "--metrics-file", full], 2), ([*args, "--exit-interval", "3"], 2)
    )
    full = losses(full)
    shutil.copytree(ckpt, str(tmp_path / "ckpt_at_3"))
    # the rest of the run; the checkpoint of iteration 3 resumed on one rank (DP1) and at TP2
    tp, tp2 = str(tmp_path / "tp.jsonl"), str(tmp_path / "tp2.jsonl")
    at_3 = [*TINY, *layout, "--train-iters", "5", "--load", str(tmp_path / "ckpt_at_3")]
    _side_by_side(
        (args, 2),
        ([*at_3, "--metrics-file", tp], 1),
        ([*at_3, "--tensor-model-parallel-size", "2", "--metrics-file", tp2], 2),
    )
    resumed = losses(part)
    assert resumed[4] == full[4]  # weights restored exactly
    assert [resumed[i] for i in range(1, 6)] == [full[i] for i in range(1, 6)]
    got = losses(tp)
    assert sorted(got) == [4, 5]
    for i in got:
        assert got[i] == pytest.approx(full[i], rel=2e-5, abs=2e-5), (i, got[i], full[i])
    got = losses(tp2)
    assert sorted(got) == [4, 5]
    for i in got:
        assert got[i] == pytest.approx(full[i], rel=2e-5, abs=2e-5), (i, got[i], full[i])


def test_async_save_and_exit_duration(tmp_path):
    """--async-save writes the tracker only once the background save is finalized, and the checkpoint
    resumes bit-exactly; --exit-duration-in-mins stops with a checkpoint at the next iteration."""
    full = str(tmp_path / "full.jsonl")
    ckpt = str(tmp_path / "ckpt")
    part = str(tmp_path / "part.jsonl")
    args = [
        *TINY,
        "--train-iters",
        "4",
        "--save",
        ckpt,
        "--load",
        ckpt,
        "--metrics-file",
        part,
        "--async-save",
        "--save-interval",
        "2",
    ]
    timed = str(tmp_path / "timed")
    timed_args = ["--train-iters", "1000", "--save", timed, "--exit-duration-in-mins", "0.0001"]
    _, _, out = _side_by_side(
        ([*TINY, "--train-iters", "4", "--metrics-file", full], 1),
        ([*args, "--exit-interval", "2"], 1),
        ([*TINY, *timed_args, "--metrics-file", str(tmp_path / "timed.jsonl")], 1),
    )
    full = losses(full)
    assert read_tracker(ckpt) == 2
    check(run(args, nproc=1))
    resumed = losses(part)
    assert [resumed[i] for i in (3, 4)] == [full[i] for i in (3, 4)]
    assert read_tracker(ckpt) == 4

    out = out.stdout
    stopped = read_tracker(timed)
    assert stopped is not None and stopped < 1000
    assert "--exit-duration-in-mins" in out
