"""At init every strategy without inner norms computes the standard model's function exactly;
dnp and unified (which add normalizations) equal each other."""

import pytest
import torch

from megatron_sv.models.gpt.model import GPTShape, build_gpt_model, transformer_config
from megatron_sv.scale_vectors.config import STRATEGIES, strategy_config
from megatron_sv.scale_vectors.stats import parameter_report, scale_vector_statistics

DENSE = GPTShape(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=64,
    seq_length=8,
    ffn_hidden_size=48,
)
MOE = GPTShape(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=64,
    seq_length=8,
    ffn_hidden_size=48,
    num_experts=4,
    moe_router_topk=2,
)
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
POS = torch.arange(8)[None].expand(2, 8)


def _logits(shape, strategy, **shape_overrides):
    import dataclasses

    shape = dataclasses.replace(shape, **shape_overrides)
    torch.manual_seed(1234)
    model = build_gpt_model(shape, strategy_config(strategy), transformer_config(shape))
    with torch.no_grad():
        return model(TOKENS, POS, None), model


@pytest.mark.parametrize("shape", [DENSE, MOE], ids=["dense", "moe"])
def test_init_equivalence(megatron_single_rank, shape):
    ref, _ = _logits(shape, "standard")
    for name in ("none", "hg", "dp", "or", "er", "iwd"):
        out, _ = _logits(shape, name)
        assert torch.equal(out, ref), f"{name} differs from standard at init"
    dnp, _ = _logits(shape, "dnp")
    unified, _ = _logits(shape, "unified")
    assert torch.equal(dnp, unified)
    assert not torch.allclose(dnp, ref)  # the inner norms do change the function


def test_init_equivalence_with_qk_norm_and_post_norms(megatron_single_rank):
    ref, _ = _logits(DENSE, "standard", qk_layernorm=True, post_sublayer_norm=True)
    for name in ("none", "hg", "dp", "or", "er"):
        out, _ = _logits(DENSE, name, qk_layernorm=True, post_sublayer_norm=True)
        assert torch.equal(out, ref), name


def test_dnp_refuses_a_second_qk_norm(megatron_single_rank):
    with pytest.raises(ValueError, match="drop --qk-layernorm"):
        _logits(DENSE, "unified", qk_layernorm=True)


def test_parameter_share_and_statistics(megatron_single_rank):
    counts = {}
    for name in STRATEGIES:
        _, model = _logits(MOE, name)
        counts[name] = parameter_report([model]).scale_vector_params
    h, ffn, nh, ng, hn, E, L = 32, 48, 4, 2, 8, 4, 2
    assert counts["none"] == 0
    assert counts["standard"] == L * 2 * h + h  # two pre-norms per layer + final norm
    # hg: q, k, v + router + every expert's gate/up get gamma_b in R^h
    assert counts["hg"] == L * (3 * h + h + E * 2 * h) + h
    # dp adds u_b: q (nh*hn), k, v (ng*hn), router (E), each expert gate/up (ffn)
    assert counts["dp"] == counts["hg"] + L * (nh * hn + 2 * ng * hn + E + E * 2 * ffn)
    assert counts["dnp"] == counts["dp"]
    assert counts["or"] == counts["standard"] + (2 * L + 1)  # one magnitude per vector
    _, model = _logits(DENSE, "unified")
    stats = scale_vector_statistics([model])
    assert stats["layer0/attn/qkv/in/q/mean"] == 1.0
    assert stats["layer1/mlp/fc1/out/gate/magnitude"] == 1.0
