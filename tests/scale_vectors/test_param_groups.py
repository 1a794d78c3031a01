"""Weight-decay groups hold exactly the expected parameters for each policy (IWD: Input-Norm only)."""

import dataclasses

import pytest

from megatron_sv.models.gpt.model import GPTShape, build_gpt_model, transformer_config
from megatron_sv.scale_vectors.config import strategy_config
from megatron_sv.scale_vectors.param_groups import (
    format_param_group_table,
    param_group_table,
    scale_vector_config_overrides,
)

SHAPE = GPTShape(
    num_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    vocab_size=32,
    seq_length=8,
    ffn_hidden_size=24,
    qk_layernorm=True,
    post_sublayer_norm=True,
)


def _decayed_names(policy, strategy="dp", shape=SHAPE):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    sv = strategy_config(strategy, weight_decay_policy=policy)
    cfg = transformer_config(shape)
    model = build_gpt_model(shape, sv, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1),
        [ddp],
        config_overrides=scale_vector_config_overrides(sv),
    )
    decayed, plain = set(), set()
    for group in opt.param_groups:
        for p in group["params"]:
            (decayed if group["wd_mult"] * 0.1 > 0 else plain).add(names[id(p)])
    return decayed, plain, sv, model


def _vector_names(model, role):
    return {n for n, p in model.named_parameters() if getattr(p, "sv_role", None) == role}


@pytest.mark.parametrize("policy", ["megatron", "all", "none", "iwd"])
def test_policy_groups(megatron_single_rank, policy):
    decayed, plain, sv, model = _decayed_names(policy)
    inputs, outputs = _vector_names(model, "input"), _vector_names(model, "output")
    matrices = {n for n, p in model.named_parameters() if p.dim() > 1}
    assert inputs and outputs
    # both roles are present in this model: HG gamma_b, final norm (input); u_b, QK-norm, post-norms (output)
    assert any("q_layernorm" in n for n in outputs) and any("post_norm" in n for n in outputs)
    assert any("final_layernorm" in n for n in inputs)
    assert matrices <= decayed
    expected_vectors = {"megatron": set(), "none": set(), "all": inputs | outputs, "iwd": inputs}[policy]
    assert decayed - matrices == expected_vectors
    assert plain == set(n for n, _ in model.named_parameters()) - decayed


def test_iwd_with_or_reparam_magnitude_inherits_role(megatron_single_rank):
    # DNP's inner norm is the QK-norm of `unified`, so this model has no separate one
    decayed, _, _, model = _decayed_names(
        "iwd", strategy="unified", shape=dataclasses.replace(SHAPE, qk_layernorm=False)
    )
    magnitudes = {n for n in _vector_names(model, "input") if n.endswith("magnitude")}
    assert magnitudes and magnitudes <= decayed
    assert not ({n for n in _vector_names(model, "output")} & decayed)


def test_table_lists_groups(megatron_single_rank):
    _, _, sv, model = _decayed_names("iwd")
    table = format_param_group_table(param_group_table(sv, [model], weight_decay=0.1))
    assert "scale vectors (Input-Norm)" in table and "scale vectors (Output-Norm)" in table
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert lines["scale vectors (Input-Norm)"].split()[-2] == "0.1"
    assert lines["scale vectors (Output-Norm)"].split()[-2] == "0"
