"""FP8 through the real command line: a TP2+SP FP8 run's checkpoint holds W (not the folded W_eff that its
bf16 weights hold during training) and resumes in bf16 at TP1, and that checkpoint resumes in FP8 again
(rowwise) - the FP8 linears have the bf16 ones' parameters and keys."""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing import load_plain_tensors

from megatron_sv.checkpointing import read_tracker
from megatron_sv.checkpointing.layout import checkpoint_dir
from tests.training.cli import TINY, check, losses, run
from tests.training.test_bf16_cli import _folded_weight_keys


def test_checkpoints_move_between_fp8_and_bf16(tmp_path, megatron_single_rank):

    a, b, c = (str(tmp_path / n) for n in ("fp8_ckpt", "bf16_ckpt", "fp8_again_ckpt"))
    ma, mb, mc = (str(tmp_path / f"{n}.jsonl") for n in "abc")
    tiny = [*TINY, "--lr-decay-iters", "8"]  # one LR schedule across the three runs
    out = check(
        run(
            [
                *tiny,
                "--bf16",
                "--fp8-format",
                "hybrid",
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
                "--train-iters",
                "4",
                "--save",
                a,
                "--metrics-file",
                ma,
            ]
        )
    ).stdout
    assert "precision: FP8 hybrid (tensorwise scaling" in out
    assert "folded at the master->model copy once per step" in out  # FP8 linears fold as bf16 ones do
    tensors = load_plain_tensors(checkpoint_dir(a, read_tracker(a)))
    keys = _folded_weight_keys(tensors)
    assert keys
    for k in keys:  # the model part is bf16(W_master), never W_eff (the vectors moved in 4 steps)
        assert torch.equal(tensors[k], tensors[f"optimizer.state.fp32_param.{k}"].to(torch.bfloat16)), k
    check(run([*tiny, "--bf16", "--train-iters", "6", "--load", a, "--save", b, "--metrics-file", mb], nproc=1))
    check(
        run(
            [
                *tiny,
                "--bf16",
                "--fp8-format",
                "e4m3",
                "--fp8-recipe",
                "rowwise",
                "--train-iters",
                "8",
                "--load",
                b,
                "--save",
                c,
                "--metrics-file",
                mc,
            ],
            nproc=1,
        )
    )
    la, lb, lc = losses(ma), losses(mb), losses(mc)
    assert sorted(la) == [1, 2, 3, 4] and sorted(lb) == [5, 6] and sorted(lc) == [7, 8]
    # each run continues where the previous one stopped (a fresh model would start near la[1])
    assert la[4] < la[1] - 0.3
    assert abs(lb[5] - la[4]) < 0.25 and abs(lc[7] - lb[6]) < 0.25, (la, lb, lc)
