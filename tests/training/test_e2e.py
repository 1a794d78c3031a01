"""End-to-end tests of pretrain_gpt_sv.py via torchrun with 2 gloo ranks on CPU."""

from __future__ import annotations

import os
import shutil

import pytest

from megatron_sv.checkpointing import read_tracker
from tests.training.cli import TINY, check, losses, read_metrics, run

ITERS = 4


def _run_layout(tmp_path, name, layout, nproc, iters=ITERS, extra=()):
    metrics = str(tmp_path / f"{name}.jsonl")
    check(run([*TINY, "--train-iters", str(iters), "--metrics-file", metrics, *layout, *extra], nproc=nproc))
    return losses(metrics)


def test_tp2_pp2_dp2_match_single_rank(tmp_path):
    ref = _run_layout(tmp_path, "tp1", [], 1)
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert ref[ITERS] < ref[1]
    for name, layout in [
        ("tp2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("pp2", ["--pipeline-model-parallel-size", "2"]),
        ("dp2", ["--use-distributed-optimizer"]),
        ("pp2_fold_once_per_step", ["--pipeline-model-parallel-size", "2", "--sv-fold-once-per-step"]),
    ]:
        got = _run_layout(tmp_path, name, layout, 2)
        assert sorted(got) == sorted(ref), name
        for i in ref:
            assert got[i] == pytest.approx(ref[i], rel=2e-5, abs=2e-5), (name, i, got[i], ref[i])


def test_resume_matches_uninterrupted_and_reshards(tmp_path):
    layout = ["--tensor-model-parallel-size", "2"]
    full = _run_layout(tmp_path, "full", layout, 2, iters=6)
    ckpt = str(tmp_path / "ckpt")
    part = str(tmp_path / "part.jsonl")
    args = [*TINY, *layout, "--train-iters", "6", "--save", ckpt, "--load", ckpt, "--metrics-file", part]
    out = check(run([*args, "--exit-interval", "3"])).stdout
    assert read_tracker(ckpt) == 3 and "exiting at iteration 3" in out
    shutil.copytree(ckpt, str(tmp_path / "ckpt_at_3"))
    check(run(args))
    resumed = losses(part)
    assert sorted(resumed) == list(range(1, 7))
    for i in range(1, 7):
        assert resumed[i] == full[i], (i, resumed[i], full[i])  # bit-exact
    assert read_tracker(ckpt) == 6
    # the TP2 checkpoint of iteration 3 resumed at PP2 (model and optimizer resharded)
    pp = str(tmp_path / "pp.jsonl")
    check(
        run(
            [
                *TINY,
                "--pipeline-model-parallel-size",
                "2",
                "--train-iters",
                "6",
                "--load",
                str(tmp_path / "ckpt_at_3"),
                "--metrics-file",
                pp,
            ]
        )
    )
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
    full = _run_layout(tmp_path, "full", layout, 2, iters=5)
    ckpt = str(tmp_path / "ckpt")
    part = str(tmp_path / "part.jsonl")
    args = [*TINY, *layout, "--train-iters", "5", "--save", ckpt, "--load", ckpt, "--metrics-file", part]
    check(run([*args, "--exit-interval", "3"]))
    shutil.copytree(ckpt, str(tmp_path / "ckpt_at_3"))
    check(run(args))
    resumed = losses(part)
    assert resumed[4] == full[4]  # weights restored exactly
    assert [resumed[i] for i in range(1, 6)] == [full[i] for i in range(1, 6)]
    tp = str(tmp_path / "tp.jsonl")
    check(
        run(
            [*TINY, *layout, "--train-iters", "5", "--load", str(tmp_path / "ckpt_at_3"), "--metrics-file", tp], nproc=1
        )
    )
    got = losses(tp)
    assert sorted(got) == [4, 5]
    for i in got:
        assert got[i] == pytest.approx(full[i], rel=2e-5, abs=2e-5), (i, got[i], full[i])
    tp2 = str(tmp_path / "tp2.jsonl")
    check(
        run(
            [
                *TINY,
                *layout,
                "--tensor-model-parallel-size",
                "2",
                "--train-iters",
                "5",
                "--load",
                str(tmp_path / "ckpt_at_3"),
                "--metrics-file",
                tp2,
            ]
        )
    )
    got = losses(tp2)
    assert sorted(got) == [4, 5]
    for i in got:
        assert got[i] == pytest.approx(full[i], rel=2e-5, abs=2e-5), (i, got[i], full[i])


def test_async_save_and_exit_duration(tmp_path):
    """--async-save writes the tracker only once the background save is finalized, and the checkpoint
    resumes bit-exactly; --exit-duration-in-mins stops with a checkpoint at the next iteration."""
    full = _run_layout(tmp_path, "full", [], 1, iters=4)
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
    check(run([*args, "--exit-interval", "2"], nproc=1))
    assert read_tracker(ckpt) == 2
    check(run(args, nproc=1))
    resumed = losses(part)
    assert [resumed[i] for i in (3, 4)] == [full[i] for i in (3, 4)]
    assert read_tracker(ckpt) == 4

    timed = str(tmp_path / "timed")
    out = check(
        run(
            [
                *TINY,
                "--train-iters",
                "1000",
                "--save",
                timed,
                "--exit-duration-in-mins",
                "0.0001",
                "--metrics-file",
                str(tmp_path / "timed.jsonl"),
            ],
            nproc=1,
        )
    ).stdout
    stopped = read_tracker(timed)
    assert stopped is not None and stopped < 1000
    assert "--exit-duration-in-mins" in out
