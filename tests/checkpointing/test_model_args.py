"""One declaration of what defines a checkpoint's model: the typed configs (GPTShape, ScaleVectorConfig).
Every field is saved, rebuilt, and compared on resume and conversion unless exempted with a reason."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from megatron_sv.checkpointing import model_io
from megatron_sv.models.gpt.model import GPTShape
from megatron_sv.scale_vectors.config import ScaleVectorConfig
from megatron_sv.training.arguments import args_for_checkpoint, build_parser, parse_args, validate_args
from tests.training.cli import TINY


def _saved(extra=()):
    config = validate_args(parse_args([*TINY, "--train-iters", "2", *extra]), world_size=1)
    return args_for_checkpoint(dataclasses.replace(config, padded_vocab_size=256))


def test_every_model_and_method_flag_is_declared():
    dests = {a.dest for a in build_parser()._actions}
    declared = set(model_io.shape_keys()) | set(model_io.sv_keys())
    method_flags = {d for d in dests if d.startswith("sv_") or d == "scale_vector_strategy"}
    assert method_flags <= declared, method_flags - declared
    # every declared key is a flag (the padded vocabulary is derived from the tokenizer and TP)
    assert declared - dests == {"padded_vocab_size"}
    exempt = set(model_io.SHAPE_FIELDS_NOT_DEFINING) | set(model_io.SV_FIELDS_NOT_DEFINING)
    assert exempt <= {f.name for f in dataclasses.fields(GPTShape)} | {
        f.name for f in dataclasses.fields(ScaleVectorConfig)
    }


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--norm-epsilon", "1e-6"], "--norm-epsilon: checkpoint 1e-05, now 1e-06"),
        (["--rotary-base", "500000"], "--rotary-base: checkpoint 10000, now 500000"),
        (["--ffn-hidden-size", "128"], "--ffn-hidden-size: checkpoint 192, now 128"),
        (["--sv-reparam", "er"], "--sv-reparam: checkpoint 'or', now 'er'"),
        (["--sv-weight-decay-policy", "all"], "--sv-weight-decay-policy: checkpoint 'iwd', now 'all'"),
        (["--scale-vector-strategy", "standard"], "--sv-branch-specific: checkpoint True, now False"),
        (["--sv-post-sublayer-norm"], "--sv-post-sublayer-norm: checkpoint False, now True"),
    ],
)
def test_a_changed_model_or_method_flag_is_named_with_both_values(extra, message):
    assert message in "; ".join(model_io.model_differences(_saved(), _saved(extra)))


def test_equal_resolved_values_are_no_difference():
    # the preset's own value spelled out, the default FFN width given explicitly, a performance switch
    same = _saved(["--sv-placement", "dual_norm", "--ffn-hidden-size", "192", "--sv-fold-once-per-step"])
    assert model_io.model_differences(_saved(), same) == []
    padded = dict(_saved(), padded_vocab_size=384)
    assert "padded vocabulary" in model_io.model_differences(_saved(), padded)[0]


def test_conversion_records_every_defining_field():
    """Conversion rebuilds the shape from saved args and writes args for the converted checkpoint from the
    same declaration: nothing defining is lost on the way (a field it dropped would read as its default)."""
    saved = _saved(["--norm-epsilon", "1e-6", "--rotary-base", "20000"])
    shape = model_io.shape_from_args(saved)
    assert shape.norm_epsilon == 1e-6 and shape.rotary_base == 20000
    written = model_io.args_for_model(shape, saved["scale_vector_strategy"])
    assert model_io.model_differences(saved, written) == []
    assert model_io.model_differences(saved, dict(written, norm_epsilon=1e-5)) == [
        "--norm-epsilon: checkpoint 1e-06, now 1e-05"
    ]


# the training command line's flags that are not the model's (pretrain_flags writes only the model's)
_RUN_FLAGS = ["--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--mock-data"]
_RUN_FLAGS += ["--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--norm-epsilon", "1e-6", "--rotary-base", "20000", "--group-query-attention", "--num-query-groups", "2"],
        ["--no-sv-branch-specific", "--sv-reparam", "er", "--sv-post-sublayer-norm", "--qk-layernorm"],
        ["--num-experts", "4", "--moe-router-topk", "1", "--moe-ffn-hidden-size", "96", "--moe-aux-loss-coeff", "0.01"],
        [
            "--position-embedding-type",
            "learned_absolute",
            "--max-position-embeddings",
            "64",
            "--normalization",
            "LayerNorm",
        ],
    ],
)
def test_model_flags_give_the_saved_model_back(extra):
    """The flags a conversion writes (model_flags.txt: pretrain_flags, derived from the declarations), read by
    the training command line, describe the same model and method, field by field."""
    saved = _saved(extra)
    argv = shlex.split(model_io.pretrain_flags(saved)) + _RUN_FLAGS
    again = args_for_checkpoint(
        dataclasses.replace(validate_args(parse_args(argv), world_size=1), padded_vocab_size=256)
    )
    assert model_io.model_differences(saved, again) == []
    assert GPTShape.from_saved(again) == GPTShape.from_saved(saved)  # the non-defining fields too
    assert model_io.sv_config_from_args(again) == model_io.sv_config_from_args(saved)


def test_the_model_builder_reads_the_same_declaration():
    """TrainingConfig.shape() (what the training loop builds) is the shape the flags declare: Megatron-LM's
    parser defaults (GeLU MLP, tied embeddings) where a flag is left out, the flags where given."""
    plain = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    config = validate_args(parse_args(plain + _RUN_FLAGS), world_size=1).with_vocab(255)
    assert config.shape() == GPTShape(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=256,
        seq_length=32,
        max_position_embeddings=32,
        swiglu=False,
        untie_embeddings_and_output_weights=False,
    )
    given = validate_args(parse_args([*TINY, "--train-iters", "2", "--num-experts", "2"]), world_size=1)
    shape = given.with_vocab(255).shape()
    assert (shape.swiglu, shape.untie_embeddings_and_output_weights, shape.num_experts) == (True, True, 2)
    assert (shape.moe_router_topk, shape.moe_token_dispatcher_type) == (2, "allgather")  # conditional defaults
