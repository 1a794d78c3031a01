"""Flag validation happens before any work, with messages that name the flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

import pytest

from megatron_sv.checkpointing import write_tracker
from megatron_sv.training.arguments import ArgumentError, build_parser, parse_args, validate_args
from megatron_sv.training.config import TrainingConfig
from tests.training.cli import TINY, run

BASE = [x for x in TINY]


def _without(argv, flag):
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def _validate(extra, world_size=2, base=BASE):
    return validate_args(parse_args([*base, "--train-iters", "4", *extra]), world_size=world_size)


def test_derived_values():
    a = _validate(["--tensor-model-parallel-size", "1", "--global-batch-size", "16"], world_size=2)
    assert a.data_parallel_size == 2 and a.num_microbatches == 4 and a.lr_decay_iters == 4
    assert a.sv_config.placement == "dual_norm" and a.sv_config.reparam == "or"
    a = _validate(["--no-sv-branch-specific", "--sv-reparam", "er"], world_size=1)
    assert a.sv_config.branch_specific is False and a.sv_config.reparam == "er"
    # conditional flags get their defaults once checked; given where they apply they are kept
    assert (a.rotary_base, a.moe_router_topk, a.fp8_recipe, a.no_load_optim) == (10000, 2, None, False)
    # --fp8-recipe defaults by backend: tensorwise for the local FP8 linears
    a = _validate(["--fp8-format", "hybrid", "--bf16"], world_size=1)
    assert (a.fp8.format, a.fp8.scaling, a.fp8_recipe) == ("hybrid", "tensorwise", "tensorwise")
    a = _validate(["--fp8-format", "e4m3", "--fp8-recipe", "rowwise", "--bf16"], world_size=1)
    assert (a.fp8.format, a.fp8.scaling) == ("e4m3", "rowwise")
    a = _validate(["--num-experts", "4", "--moe-router-topk", "1", "--sv-final-norm-role", "output"], world_size=1)
    assert a.moe_router_topk == 1 and a.sv_config.final_norm_role == "output"


@pytest.mark.parametrize(
    "extra,world,message",
    [
        (["--tensor-model-parallel-size", "3"], 2, "not divisible by tensor"),
        (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers 3 is not divisible"),
        (["--sequence-parallel"], 1, "--sequence-parallel needs"),
        (["--overlap-param-gather", "--overlap-grad-reduce"], 2, "--overlap-param-gather needs --use-distributed-opt"),
        (
            ["--overlap-param-gather", "--use-distributed-optimizer"],
            2,
            "--overlap-param-gather needs --overlap-grad-red",
        ),
        (["--group-query-attention", "--num-query-groups", "3"], 1, "not divisible by --num-query-groups"),
        (["--num-query-groups", "2"], 1, "needs --group-query-attention"),
        (["--expert-model-parallel-size", "2"], 2, "needs --num-experts"),
        (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk 5"),
        (["--lr-decay-style", "wsd"], 1, "needs --lr-wsd-decay-iters"),
        (["--min-lr", "1.0"], 1, "--min-lr"),
        (["--optimizer", "muon"], 1, "emerging-optimizers"),
        (["--fp8-format", "hybrid"], 1, "--fp8-format needs --bf16"),
        (
            ["--fp8-format", "hybrid", "--bf16", "--fp8-recipe", "delayed"],
            1,
            "--fp8-recipe on the local backend must be one of",
        ),
        (
            ["--fp8-format", "hybrid", "--bf16", "--ffn-hidden-size", "40"],
            1,
            "FP8 GEMMs need sizes divisible by 16; linear_fc2 has input_features 40",
        ),
        (
            [
                "--fp8-format",
                "hybrid",
                "--bf16",
                "--tensor-model-parallel-size",
                "2",
                "--hidden-size",
                "48",
                "--num-attention-heads",
                "2",
            ],
            2,
            "linear_qkv has output_features 72",
        ),
        (["--transformer-impl", "transformer_engine"], 1, "--transformer-impl transformer_engine: "),
        (["--scale-vector-strategy", "none", "--sv-placement", "dual"], 1, "scale vectors are disabled"),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        # flags that would be silently ignored are refused
        (
            ["--sv-fold-once-per-step", "--transformer-impl", "transformer_engine"],
            1,
            "--sv-fold-once-per-step is not implemented for --transformer-impl transformer_engine",
        ),
        (["--fp8-recipe", "tensorwise"], 1, "--fp8-recipe only applies with --fp8-format"),
        (["--lr-wsd-decay-style", "linear"], 1, "--lr-wsd-decay-style only applies with --lr-decay-style wsd"),
        (["--moe-router-topk", "1"], 1, "--moe-router-topk only applies with --num-experts"),
        (["--moe-aux-loss-coeff", "0.01"], 1, "--moe-aux-loss-coeff only applies with --num-experts"),
        (
            ["--position-embedding-type", "learned_absolute", "--rotary-base", "500000"],
            1,
            "--rotary-base only applies with --position-embedding-type rope",
        ),
        (
            ["--dist-ckpt-optim-format", "dp_reshardable"],
            1,
            "--dist-ckpt-optim-format only applies with --use-distributed-optimizer",
        ),
        (["--no-load-optim"], 1, "--no-load-optim only applies with --load"),
        (["--override-opt_param-scheduler"], 1, "--override-opt_param-scheduler only applies with --load"),
        (
            ["--load", "x", "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
            1,
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other",
        ),
        (
            ["--sv-final-norm-role", "output", "--sv-weight-decay-policy", "all"],
            1,
            "--sv-final-norm-role only applies with --sv-weight-decay-policy iwd",
        ),
        (
            ["--scale-vector-strategy", "none", "--sv-weight-decay-policy", "iwd"],
            1,
            "--sv-weight-decay-policy only applies with learnable scale vectors",
        ),
        (["--merge-file", "m.txt"], 1, "--merge-file only applies with --tokenizer-type GPT2BPETokenizer"),
    ],
)
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
        _validate(
            ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "t.model")],
            base=_without(BASE, "--vocab-size"),
        )
    with pytest.raises(ArgumentError, match="--vocab-size only applies with --tokenizer-type NullTokenizer"):
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
    r = run(
        [*TINY, "--train-iters", "2", "--global-batch-size", "6"], nproc=1, timeout=120, extra_env={"WORLD_SIZE": "2"}
    )
    assert r.returncode == 2 and "--global-batch-size 6 is not divisible" in r.stderr


# what the command line may import before the flags are known to be good: no torch, no megatron.core
_PROBE = """
import sys
from megatron_sv.training import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "megatron.core", "numpy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


def _probe(args):
    from tests.training.cli import ROOT, env

    return subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
    )


def test_help_and_argument_errors_are_fast_and_quiet():
    t0 = time.perf_counter()
    r = _probe(["--help"])
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0 and "--scale-vector-strategy" in r.stdout
    assert r.stderr == "" and "HEAVY=\n" in r.stdout  # nothing heavy imported, so no TE/Apex warnings
    assert elapsed < 10, f"--help took {elapsed:.1f} s"  # about 0.2 s; loose for a loaded 2-core machine
    # a usage error and a failed validation: one line, exit code 2, still nothing heavy imported
    r = _probe(["--num-layers", "2", "--bogus"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--hidden-size" in r.stderr
    r = _probe([*TINY, "--train-iters", "2", "--num-attention-heads", "3"])
    assert r.returncode == 2 and "HEAVY=\n" in r.stdout
    assert r.stderr == "pretrain_gpt_sv.py: error: --hidden-size 64 is not divisible by --num-attention-heads 3\n"


def test_every_flag_has_help_with_its_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        if action.required or action.const is False:  # --no-X of an on/off pair
            continue
        text = formatter._get_help_string(action)
        assert "default" in text, f"{action.option_strings[0]}: help does not state the default"


def test_wandb_flags():
    with pytest.raises(ArgumentError, match="--wandb-exp-name/--wandb-save-dir need --wandb-project"):
        _validate(["--wandb-exp-name", "x"])
    # where wandb is not installed: one line naming the package, before any work. `python -S` leaves
    # site-packages off the path, a real environment without wandb (the validation needs only the stdlib).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from megatron_sv.training import cli; "
        "sys.exit(cli.main(sys.argv[2:]))"
    )
    from tests.training.cli import ROOT

    r = subprocess.run(
        [sys.executable, "-S", "-c", code, ROOT, *BASE, "--train-iters", "2", "--wandb-project", "p"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"WORLD_SIZE": "1", "PATH": os.environ["PATH"]},
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs the package 'wandb'" in r.stderr, r.stderr


def test_validation_returns_a_config_and_leaves_the_parsed_flags_alone():
    parsed = parse_args([*BASE, "--train-iters", "4", "--num-experts", "2"])
    before = dict(vars(parsed))
    config = validate_args(parsed, world_size=2)
    assert vars(parsed) == before  # defaults and derived sizes went into the config's copy
    assert isinstance(config, TrainingConfig)
    assert (config.args.moe_router_topk, config.args.data_parallel_size, config.args.num_microbatches) == (2, 2, 2)
    assert config.padded_vocab_size is None and config.with_vocab(255).padded_vocab_size == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sv_config = None
