"""A checkpoint written before DNP's input-side vectors became direction-only resumes: the redundant
magnitudes are dropped (with a log line) and training continues exactly as the old code continued it
(weights and optimizer state land on the right parameters)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.training.cli import check, losses, run

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FLAGS = [
    "--num-layers",
    "1",
    "--hidden-size",
    "16",
    "--ffn-hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "8",
    "--swiglu",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "1",
    "--lr",
    "1e-2",
    "--lr-decay-style",
    "constant",
    "--train-iters",
    "4",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "60",
    "--make-vocab-size-divisible-by",
    "8",
    "--scale-vector-strategy",
    "unified",
    "--eval-iters",
    "0",
    "--no-scale-vector-stats",
    "--weight-decay",
    "0.1",
    "--seed",
    "5",
    "--log-interval",
    "1",
]


def test_old_unified_checkpoint_resumes_without_the_redundant_magnitudes(tmp_path):
    ckpt = str(tmp_path / "old")
    shutil.copytree(os.path.join(FIXTURES, "unified_before_direction_only"), ckpt)
    metrics = str(tmp_path / "m.jsonl")
    out = check(run([*FLAGS, "--load", ckpt, "--metrics-file", metrics], nproc=1)).stdout
    assert "dropping 4 redundant magnitude(s)" in out  # q, k, gate, up of the one layer
    expected = losses(os.path.join(FIXTURES, "unified_before_direction_only_resumed.jsonl"))
    got = losses(metrics)
    assert sorted(got) == [3, 4]
    for i in (3, 4):  # the old magnitudes only ever scaled what the inner norms normalized away
        assert got[i] == pytest.approx(expected[i], rel=1e-5), (i, got[i], expected[i])
