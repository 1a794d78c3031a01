"""DNP's fused inner norms (inner_norms.py) equal the plain autograd formula: values and every gradient,
with eager and compiled kernels, at TP1 and at TP2 (where the row statistics are all-reduced), and a DNP
model with the fused MLP equals the unfused one.

Inputs have rows of very different magnitudes (down to ~1e-2) so that eps matters: a wrong eps or a
missing all-reduce changes results far beyond the tolerances (the last tests show both are caught).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_sv.scale_vectors import inner_norms
from megatron_sv.scale_vectors.inner_norms import KERNELS_ENV, norm_swiglu, scaled_inner_norm
from megatron_sv.scale_vectors.norms import normalize
from tests.helpers.distributed import run_distributed

EPS = 1e-5
F_WIDTH = 12  # ffn width (gate and up each); split in two at TP2


def _inputs(dtype, rows=6, width=F_WIDTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(rows, 1).uniform_(-2.0, 1.0, generator=g)
    x = torch.randn(rows, 2 * width, generator=g) * scale
    ug = 0.5 + torch.rand(width, generator=g)
    uu = 0.5 + torch.rand(width, generator=g)
    gy = torch.randn(rows, width, generator=g)
    return [t.to(dtype) for t in (x, ug, uu, gy)]


def reference_norm_swiglu(x, ug, uu, kind, eps=EPS):
    """The definition, differentiated by autograd: silu(u_g N(gate)) * u_u N(up) over the full width."""
    f = x.shape[-1] // 2
    return F.silu(normalize(x[..., :f], kind, eps) * ug) * (normalize(x[..., f:], kind, eps) * uu)


def _value_and_grads(fn, x, ug, uu, gy):
    x, ug, uu = (t.detach().clone().requires_grad_() for t in (x, ug, uu))
    y = fn(x, ug, uu)
    return [y.detach(), *torch.autograd.grad((y.float() * gy.float()).sum(), (x, ug, uu))]


def _assert_all_close(got, want, **tol):
    for name, a, b in zip(("y", "dx", "du_gate", "du_up"), got, want):
        torch.testing.assert_close(a.to(b.dtype), b, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.fixture
def kernels(monkeypatch, request):
    monkeypatch.setenv(KERNELS_ENV, request.param)
    return request.param


# LayerNorm runs the same kernel bodies; checking it eagerly only saves compile time.
@pytest.mark.parametrize(
    "kernels,kind", [("eager", "RMSNorm"), ("eager", "LayerNorm"), ("compiled", "RMSNorm")], indirect=["kernels"]
)
def test_norm_swiglu_equals_definition_fp32(kernels, kind):
    x, ug, uu, gy = _inputs(torch.float32)
    got = _value_and_grads(lambda a, b, c: norm_swiglu(a, b, c, kind, EPS), x, ug, uu, gy)
    want = _value_and_grads(
        lambda a, b, c: reference_norm_swiglu(a, b, c, kind), *(t.double() for t in (x, ug, uu, gy))
    )
    _assert_all_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", ["eager", "compiled"], indirect=True)
def test_norm_swiglu_bf16_within_one_rounding(kernels):
    """In bf16 the fused op computes in fp32 and rounds each result once, so it is within bf16's unit
    roundoff (2^-8 relative) of the exact value on the same bf16 inputs; rtol 2^-7 leaves room for the
    fp32 accumulation. (The unfused path rounds N*u to bf16 before SwiGLU and is further off.)"""
    x, ug, uu, gy = _inputs(torch.bfloat16, rows=16)
    got = _value_and_grads(lambda a, b, c: norm_swiglu(a, b, c, "RMSNorm", EPS), x, ug, uu, gy)
    want = _value_and_grads(
        lambda a, b, c: reference_norm_swiglu(a, b, c, "RMSNorm"), *(t.double() for t in (x, ug, uu, gy))
    )
    _assert_all_close(got, want, rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("kernels", ["eager", "compiled"], indirect=True)
def test_per_head_inner_norm_equals_definition(kernels):
    """q/k heads normalized over head_dim with v passing through (the qkv layout), z saved for backward."""
    g = torch.Generator().manual_seed(3)
    rows, groups, slots, hn = 5, 2, 4, 8  # 2 q heads + k + v per query group
    x = torch.randn(rows, groups, slots, hn, generator=g) * 10.0 ** torch.empty(rows, 1, 1, 1).uniform_(
        -2.0, 1.0, generator=g
    )
    u = 0.5 + torch.rand(groups, slots, hn, generator=g)
    active = torch.tensor([True, True, True, False]).view(slots, 1)
    gz = torch.randn(rows, groups, slots, hn, generator=g)

    def reference(x, u):
        return torch.where(active, normalize(x, "RMSNorm", EPS), x) * u

    x1, u1 = x.clone().requires_grad_(), u.clone().requires_grad_()
    z = scaled_inner_norm(x1, u1, "RMSNorm", EPS, active=active)
    got = [z.detach(), *torch.autograd.grad((z * gz).sum(), (x1, u1))]
    x2, u2 = x.double().requires_grad_(), u.double().requires_grad_()
    r = reference(x2, u2)
    want = [r.detach(), *torch.autograd.grad((r * gz.double()).sum(), (x2, u2))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6)


# -- TP2: each rank holds [gate_r | up_r]; the norm spans the full width -----------------------------------
def _tp2_job(rank, world_size, cases):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    f = F_WIDTH // world_size
    cols = slice(rank * f, (rank + 1) * f)
    out = {}
    for key, mode, dtype, use_group, eps in cases:
        os.environ[KERNELS_ENV] = mode
        x, ug, uu, gy = _inputs(dtype)
        local_x = torch.cat([x[:, :F_WIDTH][:, cols], x[:, F_WIDTH:][:, cols]], dim=-1)
        group = dist.group.WORLD if use_group else None
        got = _value_and_grads(
            lambda a, b, c: norm_swiglu(a, b, c, "RMSNorm", eps, full_width=F_WIDTH, group=group),
            local_x,
            ug[cols],
            uu[cols],
            gy[:, cols],
        )
        out[key] = [t.clone() for t in got]
    return out


def _tp2_reference(rank, dtype, world_size=2):
    f = F_WIDTH // world_size
    cols = slice(rank * f, (rank + 1) * f)
    x, ug, uu, gy = _inputs(dtype)
    y, dx, dug, duu = _value_and_grads(
        lambda a, b, c: reference_norm_swiglu(a, b, c, "RMSNorm"), *(t.double() for t in (x, ug, uu, gy))
    )
    return [y[:, cols], torch.cat([dx[:, :F_WIDTH][:, cols], dx[:, F_WIDTH:][:, cols]], -1), dug[cols], duu[cols]]


@pytest.fixture(scope="module")
def tp2_results():
    cases = [
        ("eager", "eager", torch.float32, True, EPS),
        ("compiled", "compiled", torch.float32, True, EPS),
        ("eager_bf16", "eager", torch.bfloat16, True, EPS),  # compiled bf16: see the TP1 test
        ("no_all_reduce", "eager", torch.float32, False, EPS),  # planted bug: local statistics only
        ("wrong_eps", "eager", torch.float32, True, 1e-6),
    ]  # planted bug
    return run_distributed(_tp2_job, world_size=2, args=(cases,), timeout=600)


@pytest.mark.parametrize("key", ["eager", "compiled"])
def test_norm_swiglu_tp2_equals_full_width_definition(tp2_results, key):
    for rank, res in enumerate(tp2_results):
        _assert_all_close(res[key], _tp2_reference(rank, torch.float32), rtol=2e-5, atol=1e-6)


def test_norm_swiglu_tp2_bf16_within_one_rounding(tp2_results):
    for rank, res in enumerate(tp2_results):
        _assert_all_close(res["eager_bf16"], _tp2_reference(rank, torch.bfloat16), rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("key", ["no_all_reduce", "wrong_eps"])
def test_tp2_check_catches_planted_bugs(tp2_results, key):
    with pytest.raises(AssertionError):
        for rank, res in enumerate(tp2_results):
            _assert_all_close(res[key], _tp2_reference(rank, torch.float32), rtol=2e-5, atol=1e-6)


# -- the fused MLP in a DNP model --------------------------------------------------------------------------
def _dnp_model_loss_and_grads(fused: bool):
    from megatron_sv.models.gpt.model import GPTShape, build_gpt_model, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config
    from megatron_sv.scale_vectors.mlp import InnerNormSwiGLUMLP

    shape = GPTShape(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=64,
        seq_length=8,
        ffn_hidden_size=48,
    )
    torch.manual_seed(0)
    model = build_gpt_model(shape, strategy_config("unified"), transformer_config(shape), init_seed=7)
    mlps = [m for m in model.modules() if isinstance(m, InnerNormSwiGLUMLP)]
    assert len(mlps) == 2 and all(m.fused for m in mlps)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # vectors away from their init, so that a wrong u or branch order shows
        for name, p in model.named_parameters():
            if getattr(p, "sv_role", None) is not None:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    for m in mlps:
        m.fused = fused
    tokens = torch.randint(0, 64, (2, 9), generator=g)
    pos = torch.arange(8)[None]
    loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels", ["compiled"], indirect=True)
def test_fused_mlp_model_equals_unfused(megatron_single_rank, kernels):
    loss_f, grads_f = _dnp_model_loss_and_grads(fused=True)
    loss_u, grads_u = _dnp_model_loss_and_grads(fused=False)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_u:
        torch.testing.assert_close(
            grads_f[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_bad_kernel_mode_is_refused(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match=KERNELS_ENV):
        inner_norms.kernel_mode()
