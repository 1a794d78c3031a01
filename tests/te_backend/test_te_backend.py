"""The Transformer Engine backend on a machine without TE: clear errors, the checkpoint key schema,
and the layout/folding helpers it shares with the local backend. Nothing here pretends TE runs."""

import pytest
import torch

from megatron_sv.models.gpt.model import GPTShape, build_gpt_model, transformer_config
from megatron_sv.models.gpt.sv_layer_specs import LayerOptions, get_sv_block_spec, get_sv_layer_spec
from megatron_sv.scale_vectors import te_linears as tl
from megatron_sv.scale_vectors.config import STRATEGIES, strategy_config
from megatron_sv.scale_vectors.linears import ScaledColumnParallelLinear

TE_OK, TE_REASON = tl.transformer_engine_status()
SHAPE = GPTShape(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=64,
    seq_length=8,
    ffn_hidden_size=48,
)


# -- lazy import and the clear error ------------------------------------------------------------------
def test_status_reason_names_what_is_missing():
    if not TE_OK:
        assert "CUDA" in TE_REASON or "Transformer Engine" in TE_REASON
    else:
        assert TE_REASON == "ok"


def test_te_spec_without_te_is_a_clear_error(megatron_single_rank):
    opts = LayerOptions(num_layers=2, transformer_impl="transformer_engine")
    cfg = transformer_config(SHAPE)
    if TE_OK:  # a TE machine builds the spec
        assert get_sv_layer_spec(strategy_config("standard"), opts) is not None
        return
    for call in (
        lambda: get_sv_layer_spec(strategy_config("unified"), opts),
        lambda: get_sv_block_spec(strategy_config("standard"), opts, cfg),
        lambda: build_gpt_model(SHAPE, strategy_config("standard"), cfg, transformer_impl="transformer_engine"),
        tl.te_classes,
    ):
        with pytest.raises(tl.TransformerEngineUnavailable, match="--transformer-impl local"):
            call()


def test_unknown_transformer_impl_is_refused(megatron_single_rank):
    with pytest.raises(ValueError, match="--transformer-impl must be one of"):
        get_sv_layer_spec(strategy_config("standard"), LayerOptions(num_layers=1, transformer_impl="apex"))


def test_local_backend_unaffected_by_the_switch(megatron_single_rank):
    from megatron_sv.platform import current_device

    dev = current_device()
    shape_tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    pos = torch.arange(8, device=dev)[None].expand(2, 8)
    outs = []
    for impl_kwargs in ({}, {"transformer_impl": "local"}):
        torch.manual_seed(1234)
        model = build_gpt_model(SHAPE, strategy_config("unified"), transformer_config(SHAPE), **impl_kwargs).to(dev)
        with torch.no_grad():
            outs.append(model(shape_tokens, pos, None))
    assert torch.equal(outs[0], outs[1])


def test_fused_norm_only_for_one_plain_shared_gamma():
    fused = {name for name, sv in STRATEGIES.items() if tl.fuses_norm_into_linear(sv)}
    assert fused == {"standard", "iwd"}


# -- checkpoint key schema ----------------------------------------------------------------------------
PAIRS = [
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.input_layernorm.scale.weight"),
    ("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", "decoder.layers.1.pre_mlp_layernorm.scale.weight"),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", "decoder.layers.0.input_layernorm.bias"),
    ("module.decoder.layers.mlp.linear_fc1.layer_norm_bias", "module.decoder.layers.pre_mlp_layernorm.bias"),
    # keys that are the same on both backends
    ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_qkv.weight"),
    (
        "decoder.layers.0.mlp.linear_fc1.input_scales.gate.direction",
        "decoder.layers.0.mlp.linear_fc1.input_scales.gate.direction",
    ),
    ("decoder.final_layernorm.scale.weight", "decoder.final_layernorm.scale.weight"),
]


@pytest.mark.parametrize("te_key,local_key", PAIRS)
def test_key_mapping_both_ways(te_key, local_key):
    assert tl.te_key_to_local(te_key) == local_key
    assert tl.local_key_to_te(local_key, fused_norms=True) == te_key


def test_key_mapping_edge_cases():
    # linears' extra state has the same key on both backends (local Megatron linears write it too)
    k = "decoder.layers.0.self_attention.linear_qkv._extra_state"
    assert tl.te_key_to_local(k) == k and tl.local_key_to_te(k, fused_norms=True) == k
    # TE attention's FP8 metadata has no local counterpart
    assert tl.te_key_to_local("decoder.layers.0.self_attention.core_attention._extra_state") is None
    assert tl.te_key_to_local("decoder.layers.0.self_attention.core_attention.fused_attention._extra_state") is None
    # only whole path components match
    assert tl.te_key_to_local("x.my_mlp.linear_fc1.layer_norm_weight") == "x.my_mlp.linear_fc1.layer_norm_weight"
    # without a fused norm (every folding strategy) the local norm keys stay where they are
    k = "decoder.layers.0.input_layernorm.scale.weight"
    assert tl.local_key_to_te(k, fused_norms=False) == k
    # a reparameterized norm scale is never a TE fused weight
    k = "decoder.layers.0.input_layernorm.scale.magnitude"
    assert tl.local_key_to_te(k, fused_norms=True) == k


def _local_state(strategy, **shape_overrides):
    import dataclasses

    shape = dataclasses.replace(SHAPE, **shape_overrides)
    torch.manual_seed(1234)
    return build_gpt_model(shape, strategy_config(strategy), transformer_config(shape))


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_local_standard_state_dict_round_trips_through_te_names(megatron_single_rank, normalization):
    sd = _local_state("standard", normalization=normalization).state_dict()
    te = tl.local_state_dict_to_te(sd, fused_norms=True)
    assert not any(".input_layernorm." in k or ".pre_mlp_layernorm." in k for k in te)
    for layer in range(SHAPE.num_layers):
        assert torch.equal(
            te[f"decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight"],
            sd[f"decoder.layers.{layer}.input_layernorm.scale.weight"],
        )
        if normalization == "LayerNorm":
            assert f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_bias" in te
    assert "decoder.final_layernorm.scale.weight" in te  # our final norm on both backends
    # the local linears' _extra_state keys are part of the schema and keep their names
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in te
    back = tl.te_state_dict_to_local({**te, "decoder.layers.0.self_attention.core_attention._extra_state": None})
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("strategy", ["unified", "hg", "or", "none"])
def test_folding_strategies_keep_every_key(megatron_single_rank, strategy):
    sd = _local_state(strategy).state_dict()
    assert tl.local_state_dict_to_te(sd, fused_norms=tl.fuses_norm_into_linear(strategy_config(strategy))) == sd


def test_mapping_refuses_collisions():
    with pytest.raises(ValueError, match="map to the local key"):
        tl.te_state_dict_to_local(
            {"a.self_attention.linear_qkv.layer_norm_weight": 1, "a.input_layernorm.scale.weight": 2}
        )


def test_state_dict_hooks_on_plain_dicts():
    prefix = "decoder.layers.0.self_attention.linear_qkv."
    attn = "decoder.layers.0.self_attention.core_attention."
    sd = {
        prefix + "weight": "W",
        prefix + "layer_norm_weight": "g",
        prefix + "_extra_state": "x",
        "decoder.layers.0.self_attention.linear_proj.weight": "P",
    }
    tl.save_in_local_schema(None, sd, prefix, {})
    assert sd == {
        prefix + "weight": "W",
        "decoder.layers.0.input_layernorm.scale.weight": "g",
        prefix + "_extra_state": "x",
        "decoder.layers.0.self_attention.linear_proj.weight": "P",
    }
    sd2 = {attn + "_extra_state": "fp8 meta"}
    tl.save_in_local_schema(None, sd2, attn, {})
    assert sd2 == {}
    unexpected = ["decoder.layers.0.input_layernorm.scale.weight"]
    tl.load_from_local_schema(None, sd, prefix, {}, True, [], unexpected, [])
    assert sd[prefix + "layer_norm_weight"] == "g" and unexpected == []
    assert "decoder.layers.0.input_layernorm.scale.weight" not in sd

    class Incompatible:
        missing_keys = [attn + "_extra_state", prefix + "_extra_state", prefix + "weight"]

    inc = Incompatible()
    tl.tolerate_missing_te_only_state(None, inc)
    # only TE attention's metadata may be missing; a linear's state or weight is still reported
    assert inc.missing_keys == [prefix + "_extra_state", prefix + "weight"]


def test_sharded_keys_match_the_local_checkpoint(megatron_single_rank):
    """A TE fused norm's checkpoint key is exactly the key our local model writes for its pre-norm
    (modules see the layer-numbered prefix; the block then strips the number, as for the local norm)."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    model = _local_state("standard")
    local_norm = model.sharded_state_dict()["decoder.layers.0.input_layernorm.scale.weight"]
    te_prefix = "decoder.layers.0.self_attention.linear_qkv."
    w, g = torch.zeros(3, 2), torch.ones(2)
    layer_axis = ((0, 0, SHAPE.num_layers),)
    te_sharded = make_sharded_tensors_for_checkpoint(
        {"weight": w, "layer_norm_weight": g}, te_prefix, {"weight": 0}, layer_axis
    )
    attn_key = "decoder.layers.0.self_attention.core_attention._extra_state"
    te_sharded[attn_key] = object()
    out = tl.sharded_in_local_schema(te_sharded)
    assert set(out) == {te_prefix + "weight", te_prefix + "layer_norm_weight"}  # dict keys: module names
    replace_prefix_for_sharding(out, "decoder.layers.0.", "decoder.layers.")
    assert out[te_prefix + "layer_norm_weight"].key == local_norm.key == "decoder.layers.input_layernorm.scale.weight"
    assert out[te_prefix + "layer_norm_weight"].global_offset == local_norm.global_offset
    assert out[te_prefix + "layer_norm_weight"].data is g
    assert out[te_prefix + "weight"].key == "decoder.layers.self_attention.linear_qkv.weight"


# -- layout shared with the local backend -------------------------------------------------------------
@pytest.mark.parametrize("swiglu", [True, False])
def test_branch_plan_equals_the_local_layer(megatron_single_rank, swiglu):
    model = _local_state("unified", swiglu=swiglu)
    layer = model.decoder.layers[0]
    cfg = layer.config
    for lin in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1):
        assert isinstance(lin, ScaledColumnParallelLinear)
        plan = tl.branch_plan(
            lin.branch_layout,
            output_size=lin.output_size,
            tp_size=1,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
            kv_channels=cfg.kv_channels,
        )
        assert plan.layout == lin.layout
        assert list(plan.slot_branch) == lin.slot_branch
        assert tuple(plan.inner_norm_candidates) == tuple(lin.inner_norm_branches)
        for b, vec in lin.output_scales.items():
            assert vec.spec.size == plan.branch_rows[b]


def test_branch_plan_under_tensor_parallelism():
    plan = tl.branch_plan(
        "qkv", output_size=(8 + 2 * 2) * 16, tp_size=2, num_attention_heads=8, num_query_groups=2, kv_channels=16
    )
    assert plan.layout.groups == 1 and plan.layout.slots == 4 + 2 and plan.layout.rows == 16
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        tl.branch_plan(
            "qkv", output_size=(8 + 2 * 2) * 16, tp_size=4, num_attention_heads=8, num_query_groups=2, kv_channels=16
        )
    plan = tl.branch_plan(
        "gated_fc1", output_size=96, tp_size=2, num_attention_heads=1, num_query_groups=None, kv_channels=1
    )
    assert plan.layout.rows == 24 and plan.branch_rows == {"gate": 48, "up": 48}


def test_gemm_weight_swaps_only_inside_the_context():
    lin = torch.nn.Linear(4, 3, bias=False)
    w = lin.weight
    folded = w.detach() * 2
    x = torch.randn(5, 4)
    with tl.gemm_weight(lin, folded):
        assert lin.weight is folded
        y = lin(x)
    assert lin.weight is w and isinstance(lin.weight, torch.nn.Parameter)
    assert torch.allclose(y, x @ folded.t())
    assert [p is w for p in lin.parameters()] == [True]


def test_folded_weight_gradients_reach_the_vectors_through_a_swapped_gemm():
    """The TE layer's forward pattern (fold, swap into the GEMM module, recompute the saved weight) on a
    torch Linear standing in for the GEMM: gradients equal the unfolded reference."""
    from megatron_sv.scale_vectors.folding import FoldLayout, fold_into_weight, recompute_saved_weight

    torch.manual_seed(0)
    lay = FoldLayout(groups=2, slots=3, rows=4)
    lin = torch.nn.Linear(5, lay.out_features, bias=False)
    gam = torch.nn.Parameter(torch.rand(3, 5) + 0.5)
    u = torch.nn.Parameter(torch.rand(2, 3, 4) + 0.5)
    x = torch.randn(7, 5)

    def fold():
        return fold_into_weight(lin.weight, lay, gam, u)

    w_eff = fold().contiguous()
    with recompute_saved_weight(w_eff, lambda: fold().detach()), tl.gemm_weight(lin, w_eff):
        y = lin(x)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (lin.weight, gam, u)]
    for t in (lin.weight, gam, u):
        t.grad = None
    w = lin.weight.view(2, 3, 4, 5) * gam[None, :, None, :] * u[..., None]
    (x @ w.reshape(-1, 5).t()).square().sum().backward()
    for a, t in zip(got, (lin.weight, gam, u)):
        assert torch.allclose(a, t.grad, rtol=1e-5, atol=1e-6)
