"""The Transformer Engine backend on a machine without TE: clear errors, the checkpoint key schema,
and that the TE linears are the local ones' mixins on TE's GEMM. Nothing here pretends TE runs."""

import dataclasses
import functools

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sv.models.gpt.backends import transformer_engine_backend
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
        transformer_engine_backend,
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


# -- one home for the method: every backend's linears are the same mixins on a different GEMM ------------
def _methods(cls):
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("__")} | (
        {"__init__"} if "__init__" in vars(cls) else set()
    )


def _te_class_defs():
    """The class definitions of te_modules.py, read from its source (TE is not importable here)."""
    import ast
    import inspect

    from megatron_sv.scale_vectors import te_linears

    path = inspect.getfile(te_linears).replace("te_linears.py", "te_modules.py")
    tree = ast.parse(open(path).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            defs = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            out[node.name] = (bases, defs)
    return out


def test_backends_supply_only_their_gemm():
    """The local, FP8 and TE column linears with vectors share BranchScaleVectors and define nothing of the
    method themselves: only their constructor, their GEMM (``_gemm``) and forward's signature; the post-norm
    row linears share PostSublayerNorm."""
    from megatron_sv.fp8.layers import FP8PostNormRowParallelLinear, FP8ScaledColumnParallelLinear
    from megatron_sv.scale_vectors.branches import BranchScaleVectors
    from megatron_sv.scale_vectors.linears import PostNormRowParallelLinear, PostSublayerNorm

    plumbing = {"__init__", "_gemm", "forward"}
    assert issubclass(ScaledColumnParallelLinear, BranchScaleVectors)
    assert _methods(ScaledColumnParallelLinear) <= plumbing
    assert issubclass(FP8ScaledColumnParallelLinear, ScaledColumnParallelLinear)
    assert not _methods(FP8ScaledColumnParallelLinear)
    assert issubclass(FP8PostNormRowParallelLinear, PostNormRowParallelLinear)
    assert issubclass(PostNormRowParallelLinear, PostSublayerNorm) and _methods(PostNormRowParallelLinear) == {
        "__init__"
    }
    te = _te_class_defs()
    bases, defs = te["SVTEColumnParallelLinear"]
    assert "BranchScaleVectors" in bases and defs <= plumbing
    bases, defs = te["SVTEPostNormRowParallelLinear"]
    assert bases[0] == "PostSublayerNorm" and defs == {"__init__"}
    for name in ("SVTELayerNormColumnParallelLinear", "SVTEColumnParallelLinear", "SVTERowParallelLinear"):
        assert te[name][0][0] in ("LocalSchema", "PostSublayerNorm"), name  # checkpoints in the local schema


def _walk(spec, path="layer"):
    """(path, module class, params) of every slot of a layer spec, depth first."""
    if isinstance(spec, ModuleSpec):
        yield path, spec.module, dict(spec.params)
        if dataclasses.is_dataclass(spec.submodules):
            for f in dataclasses.fields(spec.submodules):
                yield from _walk(getattr(spec.submodules, f.name), f"{path}.{f.name}")
    elif isinstance(spec, functools.partial):
        yield path, spec.func, dict(spec.keywords)
    else:
        yield path, spec, {}


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("strategy", ["standard", "unified"])
def test_fp8_backend_changes_only_the_linear_classes(strategy, moe):
    """One spec body: the FP8 layer spec is the local one, slot for slot, with each column/row linear
    replaced by the FP8 backend's class (same params plus the recipe) and nothing else changed."""
    from megatron_sv.fp8.recipe import FP8Recipe
    from megatron_sv.models.gpt.backends import LOCAL, fp8_backend

    recipe = FP8Recipe("hybrid", "rowwise")
    opts = LayerOptions(num_layers=2, num_experts=4 if moe else None, post_sublayer_norm=True)
    sv = strategy_config(strategy)
    local = list(_walk(get_sv_layer_spec(sv, opts)))
    fp8 = list(_walk(get_sv_layer_spec(sv, dataclasses.replace(opts, fp8=recipe))))
    assert [p for p, _, _ in local] == [p for p, _, _ in fp8]
    fields = ("scaled_column_linear", "row_linear", "post_norm_row_linear")
    swaps = {getattr(LOCAL, f): getattr(fp8_backend(recipe), f) for f in fields}
    swapped = 0
    for (path, module, params), (_, module8, params8) in zip(local, fp8):
        if isinstance(module, type) and module in swaps:
            assert module8 is swaps[module] and params8 == dict(params, fp8=recipe), path
            swapped += 1
        else:
            assert module8 == module and params8 == params, path
    # qkv, proj, fc1, fc2 (in an MoE layer: the experts' fc1 and fc2)
    assert swapped == 4


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


class _SwappedGemmLinear(ScaledColumnParallelLinear):
    """The TE column linear's GEMM pattern on Megatron's local GEMM: the folded weight is swapped into the
    module's weight slot (``gemm_weight``) and the GEMM reads ``self.weight``, as TE's modules do."""

    def _gemm(self, input_, weight):
        if weight is None or weight is self.weight:
            return ColumnParallelLinear.forward(self, input_)
        with tl.gemm_weight(self, weight):
            return ColumnParallelLinear.forward(self, input_)


@pytest.mark.parametrize("plan", ["micro_batch", "step"])
def test_swapped_weight_gemm_equals_the_local_layer(megatron_single_rank, plan):
    """BranchScaleVectors around a GEMM that is handed W_eff by swapping (TE's way): output and every
    gradient equal the local layer's, with the per-micro-batch fold (recompute of the saved weight) and with
    the cached per-step fold and its chain rule."""
    from megatron_sv.scale_vectors.step_fold import FoldPolicy, attach

    cfg = transformer_config(SHAPE)
    common = dict(
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        gather_output=False,
        sv=strategy_config("unified"),
        branch_layout="qkv",
    )
    out = (4 + 2 * 2) * 8
    torch.manual_seed(0)
    swapped, local = _SwappedGemmLinear(32, out, **common), ScaledColumnParallelLinear(32, out, **common)
    gen = torch.Generator().manual_seed(3)
    for vec in list(swapped.input_scales.values()) + list(swapped.output_scales.values()):
        vec.set_value(0.5 + torch.rand(vec.local_size, generator=gen))
    local.load_state_dict(swapped.state_dict())
    folder = attach([swapped], None, FoldPolicy(mode=plan))
    x = torch.randn(3, 2, 32, generator=gen)
    dy = torch.randn(3, 2, out, generator=gen)
    ys = []
    for layer in (swapped, local):
        y, _ = layer(x)
        (y * dy).sum().backward()
        ys.append(y.detach())
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-6)
    for p in swapped.parameters():  # what Megatron's DDP hook does under a step fold
        p.main_grad = p.grad.detach().clone()
    folder.apply_chain_rule()
    named = dict(local.named_parameters())
    for name, p in swapped.named_parameters():
        torch.testing.assert_close(p.main_grad, named[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert isinstance(swapped.weight, torch.nn.Parameter)
