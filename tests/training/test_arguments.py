"""Flag validation happens before any work, with messages that name the flag."""

from __future__ import annotations

import os

import pytest

from megatron_sv.checkpointing import write_tracker
from megatron_sv.training.arguments import ArgumentError, parse_args, validate_args
from tests.training.cli import TINY, run

BASE = [x for x in TINY]


def _validate(extra, world_size=2, base=BASE):
    return validate_args(parse_args([*base, "--train-iters", "4", *extra]), world_size=world_size)


def test_derived_values():
    a = _validate(["--tensor-model-parallel-size", "1", "--global-batch-size", "16"], world_size=2)
    assert a.data_parallel_size == 2 and a.num_microbatches == 4 and a.lr_decay_iters == 4
    assert a.sv_config.placement == "dual_norm" and a.sv_config.reparam == "or"
    a = _validate(["--no-sv-branch-specific", "--sv-reparam", "er"], world_size=1)
    assert a.sv_config.branch_specific is False and a.sv_config.reparam == "er"


@pytest.mark.parametrize("extra,world,message", [
    (["--tensor-model-parallel-size", "3"], 2, "not divisible by tensor"),
    (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers 3 is not divisible"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs"),
    (["--group-query-attention", "--num-query-groups", "3"], 1, "not divisible by --num-query-groups"),
    (["--num-query-groups", "2"], 1, "needs --group-query-attention"),
    (["--expert-model-parallel-size", "2"], 2, "needs --num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk 5"),
    (["--lr-decay-style", "wsd"], 1, "needs --lr-wsd-decay-iters"),
    (["--min-lr", "1.0"], 1, "--min-lr"),
    (["--optimizer", "muon"], 1, "emerging-optimizers"),
    (["--fp8-format", "hybrid"], 1, "--fp8-format needs --transformer-impl transformer_engine"),
    (["--transformer-impl", "transformer_engine"], 1, "--transformer-impl transformer_engine: "),
    (["--scale-vector-strategy", "none", "--sv-placement", "dual"], 1, "scale vectors are disabled"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
])
def test_bad_flag_combinations(extra, world, message):
    with pytest.raises(ArgumentError, match=message.replace("-", r"\-").replace("(", r"\(")):
        _validate(extra, world)


def test_data_and_tokenizer_files(tmp_path):
    no_mock = [x for x in BASE if x != "--mock-data"]
    with pytest.raises(ArgumentError, match="no training data"):
        _validate([], base=no_mock)
    with pytest.raises(ArgumentError, match="missing .*missing.bin"):
        _validate(["--data-path", str(tmp_path / "missing")], base=no_mock)
    with pytest.raises(ArgumentError, match="--tokenizer-model .* does not exist"):
        _validate(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "t.model")])


def test_checkpoint_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArgumentError, match="has no latest_checkpointed_iteration.txt"):
        _validate(["--load", str(empty)])
    with pytest.raises(ArgumentError, match="does not exist"):
        _validate(["--load", str(tmp_path / "nothing")])
    _validate(["--load", str(tmp_path / "new"), "--save", str(tmp_path / "new")])  # auto-resume, first run
    other = tmp_path / "other"
    os.makedirs(other / "iter_0000010")
    with open(other / "iter_0000010" / "metadata.json", "w") as f:
        f.write("{}")
    write_tracker(str(other), 10)
    with pytest.raises(ArgumentError, match="already holds checkpoints of another run"):
        _validate(["--save", str(other)])
    _validate(["--save", str(other), "--load", str(other)])
    write_tracker(str(other), 20)  # names a missing checkpoint
    with pytest.raises(ArgumentError, match="missing or incomplete"):
        _validate(["--load", str(other)])


def test_cli_fails_fast_with_message(tmp_path):
    args = [x for x in TINY if x != "--mock-data"] + ["--train-iters", "2", "--data-path", str(tmp_path / "nope")]
    r = run(args, nproc=1, timeout=120)
    assert r.returncode == 2
    assert "error: --data-path/--split: dataset" in r.stderr and "nope.bin" in r.stderr
    r = run([*TINY, "--train-iters", "2", "--global-batch-size", "6"], nproc=1, timeout=120,
            extra_env={"WORLD_SIZE": "2"})
    assert r.returncode == 2 and "--global-batch-size 6 is not divisible" in r.stderr
