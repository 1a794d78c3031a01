"""ScaledColumnParallelLinear equals an unfolded per-branch reference (values and gradients)."""

import pytest
import torch

from megatron_sv.models.gpt.model import GPTShape, transformer_config
from megatron_sv.scale_vectors.branches import branch_plan
from megatron_sv.scale_vectors.config import strategy_config
from megatron_sv.scale_vectors.linears import ScaledColumnParallelLinear
from megatron_sv.scale_vectors.norms import normalize

H, NH, NG = 16, 4, 2
HN = H // NH


def _randomize_vectors(layer, gen):
    for vec in list(layer.input_scales.values()) + list(layer.output_scales.values()):
        vec.set_value(0.5 + torch.rand(vec.local_size, generator=gen))


def _qkv_reference(layer, x, placement, kind="RMSNorm"):
    """Each branch on its own: q/k/v rows of each group read x * gamma_b; DP scales rows by u_b;
    DNP normalizes every q/k head over head_dim before u_b."""
    qpg = NH // NG
    w = layer.weight.view(NG, qpg + 2, HN, H)
    g = {b: layer.input_scales[b]() for b in ("q", "k", "v")}
    u = {b: layer.output_scales[b]() for b in ("q", "k", "v")} if layer.output_scales else None
    outs = []
    for grp in range(NG):
        for slot in range(qpg + 2):
            b = "q" if slot < qpg else ("k" if slot == qpg else "v")
            y = (x * g[b]) @ w[grp, slot].T
            if u is not None:
                if b == "q":
                    uu = u["q"].view(NG, qpg, HN)[grp, slot]
                else:
                    uu = u[b].view(NG, HN)[grp]
                if placement == "dual_norm" and b in ("q", "k"):
                    y = normalize(y, kind, 1e-5)
                y = y * uu
            outs.append(y)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("strategy", ["hg", "dp", "dnp", "unified"])
def test_qkv_fold_equals_unfolded_reference(megatron_single_rank, strategy, kind):
    sv = strategy_config(strategy)
    shape = GPTShape(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=NH,
        num_query_groups=NG,
        vocab_size=32,
        seq_length=8,
        normalization=kind,
    )
    cfg = transformer_config(shape)
    torch.manual_seed(0)
    layer = ScaledColumnParallelLinear(
        H,
        (NH + 2 * NG) * HN,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        gather_output=False,
        sv=sv,
        branch_layout="qkv",
    )
    gen = torch.Generator().manual_seed(3)
    _randomize_vectors(layer, gen)
    x = torch.randn(5, 2, H, generator=gen)
    dy = torch.randn(5, 2, (NH + 2 * NG) * HN, generator=gen)
    params = [p for p in layer.parameters()]

    out, _ = layer(x)
    grads = torch.autograd.grad((out * dy).sum(), params)
    ref = _qkv_reference(layer, x, sv.placement, kind)
    ref_grads = torch.autograd.grad((ref * dy).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(layer.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gated_fc1_dnp_normalizes_whole_width(megatron_single_rank):
    sv = strategy_config("dnp")
    shape = GPTShape(
        num_layers=1, hidden_size=H, num_attention_heads=NH, vocab_size=32, seq_length=8, ffn_hidden_size=12
    )
    cfg = transformer_config(shape)
    layer = ScaledColumnParallelLinear(
        H,
        24,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        gather_output=False,
        sv=sv,
        branch_layout="gated_fc1",
    )
    gen = torch.Generator().manual_seed(5)
    _randomize_vectors(layer, gen)
    x = torch.randn(3, 2, H, generator=gen)
    out, _ = layer(x)
    w = layer.weight.view(2, 12, H)
    expected = []
    for i, b in enumerate(("gate", "up")):
        y = (x * layer.input_scales[b]()) @ w[i].T
        expected.append(normalize(y, "RMSNorm", 1e-5) * layer.output_scales[b]())
    torch.testing.assert_close(out, torch.cat(expected, -1), rtol=1e-5, atol=1e-5)


def test_qkv_needs_divisible_query_groups(megatron_single_rank):
    shape = GPTShape(num_layers=1, hidden_size=H, num_attention_heads=NH, vocab_size=32, seq_length=8)
    cfg = transformer_config(shape)
    with pytest.raises(ValueError, match="unknown branch layout"):
        ScaledColumnParallelLinear(
            H,
            3 * H,
            config=cfg,
            init_method=cfg.init_method,
            bias=False,
            sv=strategy_config("hg"),
            branch_layout="qkvo",
        )


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_scaled_inner_norm_matches_autograd_formula(kind):
    from megatron_sv.scale_vectors.inner_norms import scaled_inner_norm

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    u = (0.5 + torch.rand(4, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    dz = torch.randn(3, 2, 4, 6, generator=gen, dtype=torch.float64)
    z = scaled_inner_norm(x, u, kind, 1e-5)
    ref = normalize(x, kind, 1e-5) * u
    torch.testing.assert_close(z, ref)
    got = torch.autograd.grad((z * dz).sum(), (x, u))
    want = torch.autograd.grad((ref * dz).sum(), (x, u))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_scaled_inner_norm_with_tiny_scale_falls_back_to_input(kind):
    from megatron_sv.scale_vectors.inner_norms import scaled_inner_norm

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.rand(8, generator=gen, dtype=torch.float64)
    u[3] = 0.0  # N(x) cannot be recovered from the output in this channel
    u.requires_grad_()
    dz = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((scaled_inner_norm(x, u, kind, 1e-5) * dz).sum(), (x, u))
    want = torch.autograd.grad(((normalize(x, kind, 1e-5) * u) * dz).sum(), (x, u))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strategy,magnitude", [("unified", "magnitude"), ("dnp", None)])
def test_input_vectors_before_inner_norms_are_direction_only(megatron_single_rank, strategy, magnitude):
    """Under DNP, q/k/gate/up's input-side vectors feed the inner norm: no magnitude parameter (v keeps one,
    output-side vectors too)."""
    sv = strategy_config(strategy)
    shape = GPTShape(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=NH,
        num_query_groups=NG,
        vocab_size=32,
        seq_length=8,
        ffn_hidden_size=12,
    )
    cfg = transformer_config(shape)
    qkv = ScaledColumnParallelLinear(
        H,
        (NH + 2 * NG) * HN,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        gather_output=False,
        sv=sv,
        branch_layout="qkv",
    )
    fc1 = ScaledColumnParallelLinear(
        H,
        24,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        gather_output=False,
        sv=sv,
        branch_layout="gated_fc1",
    )
    names = {n for m in (qkv, fc1) for n, _ in m.named_parameters()}
    if magnitude is None:  # plain vectors: nothing to drop
        assert {"input_scales.q.weight", "input_scales.gate.weight"} <= names
    else:
        assert not any(n == f"input_scales.{b}.{magnitude}" for b in ("q", "k", "gate", "up") for n in names)
        assert {"input_scales.v.magnitude", "output_scales.q.magnitude", "output_scales.up.magnitude"} <= names


def test_branch_plan_under_tensor_parallelism():
    plan = branch_plan(
        "qkv", output_size=(8 + 2 * 2) * 16, tp_size=2, num_attention_heads=8, num_query_groups=2, kv_channels=16
    )
    assert plan.layout.groups == 1 and plan.layout.slots == 4 + 2 and plan.layout.rows == 16
    assert plan.slot_branch == ("q",) * 4 + ("k", "v")
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        branch_plan(
            "qkv", output_size=(8 + 2 * 2) * 16, tp_size=4, num_attention_heads=8, num_query_groups=2, kv_channels=16
        )
    plan = branch_plan(
        "gated_fc1", output_size=96, tp_size=2, num_attention_heads=1, num_query_groups=None, kv_channels=1
    )
    assert plan.layout.rows == 24 and plan.branch_rows == {"gate": 48, "up": 48}
