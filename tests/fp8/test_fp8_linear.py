"""FP8 linears on torch._scaled_mm (single rank): the error model of docs/fp8.md, checked piece by piece.

Exact (up to fp32 accumulation): every GEMM equals the fp64 product of its dequantized FP8 operands,
with the scale axes of docs/fp8.md (an emulation built from ``quantize``). Within FP8 rounding: outputs and
all gradients (input, weight, every scale vector) against the bf16-free fp32 reference layer; the bounds
are justified below and shown to catch a dropped scale vector.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_sv.fp8.layers import FP8ColumnParallelLinear, FP8RowParallelLinear, FP8ScaledColumnParallelLinear
from megatron_sv.fp8.quantize import quantize, scaled_mm
from megatron_sv.fp8.recipe import FP8Recipe, FP8Unsupported, check_fp8_capability
from megatron_sv.models.gpt.model import GPTShape, transformer_config
from megatron_sv.scale_vectors import training_hooks
from megatron_sv.scale_vectors.config import strategy_config
from megatron_sv.scale_vectors.linears import ScaledColumnParallelLinear
from megatron_sv.scale_vectors.step_fold import FoldPolicy, attach

RECIPES = [
    FP8Recipe("e4m3", "tensorwise"),
    FP8Recipe("hybrid", "tensorwise"),
    FP8Recipe("e4m3", "rowwise"),
    FP8Recipe("hybrid", "rowwise"),
]
H, NH, NG = 64, 4, 2  # kv_channels 16: every fused size is a multiple of 16
# Normwise relative error bounds. One e4m3 cast has a relative rounding error <= 2^-4 (uniform, RMS
# 2^-4/sqrt(3) = 3.6%); a product of two casts about sqrt(2) of that, 5.1% worst RMS; e5m2 has one mantissa
# bit less (RMS 7.2%), 8.8% with an e4m3 partner. Measured: 3.6-3.7% (e4m3 x e4m3), 5.4-6.2% (e5m2 x e4m3).
BOUND = {torch.float8_e4m3fn: 0.06, torch.float8_e5m2: 0.10}


def rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _config():
    return transformer_config(
        GPTShape(num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG, vocab_size=32, seq_length=8)
    )


def _emulated_linear(x2, w, g2, recipe):
    """fp64 products of dequantized operands, quantized along the axes docs/fp8.md states."""
    rw, e4, eg = recipe.rowwise, recipe.forward_dtype, recipe.grad_dtype
    deq = lambda t, dt: quantize(t, dt, rw).dequantize().double()  # noqa: E731
    y = deq(x2, e4) @ deq(w, e4).T
    dx = deq(g2, eg) @ (deq(w.T, e4).T if rw else deq(w, e4))
    dw = deq(g2.T, eg) @ (deq(x2.T, e4).T if rw else deq(x2, e4))
    return y, dx, dw


def _pair(cls, ref_cls, recipe, in_f, out_f, cfg):
    kw = (
        dict(gather_output=False)
        if ref_cls is ColumnParallelLinear
        else dict(input_is_parallel=True, skip_bias_add=True)
    )
    torch.manual_seed(0)
    fp8 = cls(in_f, out_f, config=cfg, init_method=cfg.init_method, bias=False, fp8=recipe, **kw)
    ref = ref_cls(in_f, out_f, config=cfg, init_method=cfg.init_method, bias=False, **kw)
    ref.weight.data.copy_(fp8.weight.data)
    return fp8, ref


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.format}-{r.scaling}")
def test_scaled_mm_is_the_product_of_dequantized_operands(recipe):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 48, generator=gen) * 3, torch.randn(32, 48, generator=gen) / 7
    qa = quantize(a, recipe.grad_dtype, recipe.rowwise)
    qb = quantize(b, recipe.forward_dtype, recipe.rowwise).t()
    out = scaled_mm(qa, qb, torch.float32)
    torch.testing.assert_close(out.double(), qa.dequantize().double() @ qb.dequantize().double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_rounding_bound(dtype):
    """Per element: |q - x| <= 2^-(mantissa bits + 1) |x| in the normal range, amax maps to max(dtype)."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 5
    q = quantize(x, dtype, rowwise=False)
    back = q.dequantize()
    mant = 3 if dtype == torch.float8_e4m3fn else 2
    normal = x.abs() * (1 / q.inv_scale) >= torch.finfo(dtype).smallest_normal
    assert float(((back - x).abs() / x.abs())[normal].max()) <= 2.0 ** -(mant + 1) + 1e-7
    assert float(q.data.float().abs().max()) == torch.finfo(dtype).max


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.format}-{r.scaling}")
@pytest.mark.parametrize("kind", ["column", "row"])
def test_fp8_linear_forward_and_gradients(megatron_single_rank, recipe, kind):
    """Exact against the emulation; within FP8 error of the fp32 layer (and not bf16-exact: FP8 is used).
    Tokens 7 x 3 = 21 are not a multiple of 16: the wgrad contraction is padded."""
    cfg = _config()
    cls, ref_cls = (
        (FP8ColumnParallelLinear, ColumnParallelLinear)
        if kind == "column"
        else (FP8RowParallelLinear, RowParallelLinear)
    )
    fp8, ref = _pair(cls, ref_cls, recipe, H, 48, cfg)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, H, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(7, 3, 48, generator=gen)
    y, _ = fp8(x)
    y_ref, _ = ref(x_ref)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()

    ey, edx, edw = _emulated_linear(x.detach().view(-1, H), fp8.weight.detach(), dy.view(-1, 48), recipe)
    torch.testing.assert_close(y.double().view(-1, 48), ey, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().view(-1, H), edx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8.weight.grad.double(), edw, rtol=1e-5, atol=1e-5)

    fwd, grad = BOUND[recipe.forward_dtype], BOUND[recipe.grad_dtype]
    for got, want, bound in ((y, y_ref, fwd), (x.grad, x_ref.grad, grad), (fp8.weight.grad, ref.weight.grad, grad)):
        assert 0.005 < rel(got, want) < bound


def _scaled_pair(strategy, layout, recipe):
    cfg = _config()
    # plain vectors: OR/ER reparameterizations act after the vector gradient (tested in fp32 elsewhere), and
    # the OR magnitude's gradient is a cancelling sum whose relative error says nothing about FP8
    sv = strategy_config(strategy, reparam="none")
    out = (NH + 2 * NG) * (H // NH) if layout == "qkv" else 2 * 96
    common = dict(config=cfg, init_method=cfg.init_method, bias=False, gather_output=False, sv=sv, branch_layout=layout)
    torch.manual_seed(0)
    fp8 = FP8ScaledColumnParallelLinear(H, out, fp8=recipe, **common)
    ref = ScaledColumnParallelLinear(H, out, **common)
    gen = torch.Generator().manual_seed(3)
    for vec in list(fp8.input_scales.values()) + list(fp8.output_scales.values()):
        vec.set_value(0.5 + torch.rand(vec.local_size, generator=gen))
    ref.load_state_dict(fp8.state_dict())
    return fp8, ref, out


def _run_micro_batches(layer, xs, dys, folder=None):
    """The step's gradients: autograd's (no folder), or dL/dW_eff accumulated over the micro-batches and
    turned into the true gradients by the step's chain rule (``folder``, as training_hooks does)."""
    for x, dy in zip(xs, dys):
        y, _ = layer(x)
        (y * dy).sum().backward()
    if folder is None:
        return {n: p.grad for n, p in layer.named_parameters()}
    for p in layer.parameters():  # what Megatron's DDP hook does: main_grad accumulates param.grad
        p.main_grad = p.grad.detach().clone()
    folder.apply_chain_rule()  # training_hooks.before_optimizer_step
    return {n: p.main_grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("recipe", [RECIPES[1], RECIPES[3]], ids=lambda r: f"{r.format}-{r.scaling}")
@pytest.mark.parametrize(
    "strategy,layout", [("hg", "qkv"), ("dp", "gated_fc1"), ("unified", "qkv"), ("unified", "gated_fc1")]
)
def test_scale_vectors_ride_on_fp8_within_fp8_error(megatron_single_rank, strategy, layout, recipe):
    """Two micro-batches on step_fold's cached W_eff (what an fp32 FP8 layer gets), then the step's chain
    rule: output, input, weight and every vector gradient within FP8 error of the fp32 layer; the same
    bound rejects the FP8 layer against a reference whose u or gamma is dropped (the bound is tight enough
    to see a missing vector)."""
    fp8, ref, out = _scaled_pair(strategy, layout, recipe)
    folder = attach([fp8], None, FoldPolicy())
    assert folder.plans() == {"cached": 1}  # an FP8 layer folds once per step also in fp32
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(5, 4, H, generator=gen, requires_grad=True) for _ in range(2)]
    xs_ref = [x.detach().clone().requires_grad_() for x in xs]
    dys = [torch.randn(5, 4, out, generator=gen) for _ in range(2)]
    y = fp8(xs[0])[0].detach()
    y_ref = ref(xs_ref[0])[0].detach()
    assert rel(y, y_ref) < BOUND[recipe.forward_dtype]
    grads = _run_micro_batches(fp8, xs, dys, folder)
    want = _run_micro_batches(ref, xs_ref, dys)
    assert fp8.fp8_weights.casts == 1  # quantized once for the step's three forwards
    grad = BOUND[recipe.grad_dtype]
    for x, x_ref in zip(xs, xs_ref):
        assert rel(x.grad, x_ref.grad) < grad
    assert any("scales" in n for n in want)
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        assert rel(g, want[name]) < 1.5 * grad, name  # contractions of two FP8 products

    # sensitivity: the fp32 layer without its vectors differs from the FP8 layer by more than the bound
    for group in ("output_scales", "input_scales"):
        for vec in getattr(ref, group).values():
            vec.set_value(torch.ones(vec.local_size))
    if ref.output_scales or ref.input_scales:
        assert rel(y, ref(xs_ref[0])[0].detach()) > BOUND[recipe.forward_dtype]


def test_rowwise_u_lands_in_the_weight_scale(megatron_single_rank):
    """Rowwise: the FP8 values of diag(u) W are those of W (up to the sign of u) and |u| is in the scale."""
    recipe = FP8Recipe("hybrid", "rowwise")
    fp8, _, _ = _scaled_pair("dp", "gated_fc1", recipe)
    w = fp8.weight.detach()
    u = fp8._folded_output_scales().detach().reshape(-1, 1)
    plain, folded = quantize(w, recipe.forward_dtype, True), quantize(u * w, recipe.forward_dtype, True)
    same = (plain.data.float() * torch.sign(u) == folded.data.float()).float().mean()
    assert same > 0.999
    torch.testing.assert_close(folded.inv_scale, plain.inv_scale * u.abs(), rtol=1e-6, atol=0)
    # mixed precision: the cast reads bf16(W_eff), one bf16 rounding of the fp32 fold. The scale holds |u|
    # up to two bf16 roundings (2^-7 relative); the FP8 values agree but where the bf16 rounding decides an
    # FP8 rounding tie (measured: 96.7-97.2 % of the elements agree)
    plain, folded = (
        quantize(w.bfloat16(), recipe.forward_dtype, True),
        quantize((u * w).bfloat16(), recipe.forward_dtype, True),
    )
    same = (plain.data.float() * torch.sign(u) == folded.data.float()).float().mean()
    assert same > 0.95
    torch.testing.assert_close(folded.inv_scale, plain.inv_scale * u.abs(), rtol=2**-7, atol=0)


def test_fp8_weight_cast_once_per_step_and_never_stale(megatron_single_rank):
    """Three micro-batches share one cast; a write through .data followed by after_parameters_changed (what
    the optimizer step does) re-casts, and the output follows the new weight."""
    recipe = FP8Recipe("hybrid", "tensorwise")
    fp8, ref = _pair(FP8RowParallelLinear, RowParallelLinear, recipe, H, 48, _config())
    x = torch.randn(4, 2, H, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        fp8(x)[0].sum().backward()
    assert fp8.fp8_weights.casts == 1
    with torch.no_grad():
        new = torch.randn_like(fp8.weight) * 0.05
        fp8.weight.data.copy_(new)  # like the mixed-precision optimizer's main -> model copy
        ref.weight.data.copy_(new)
    training_hooks.after_parameters_changed([fp8])
    y = fp8(x)[0]
    assert fp8.fp8_weights.casts == 2
    assert rel(y, ref(x)[0]) < BOUND[recipe.forward_dtype]


def test_scaled_fp8_refolds_after_the_step(megatron_single_rank):
    """The cached W_eff and its FP8 copies follow vector updates made through .data (which do not bump
    _version) once the parameters generation moves; not before (what the generation key is for)."""
    recipe = FP8Recipe("hybrid", "rowwise")
    fp8, ref, _ = _scaled_pair("dp", "qkv", recipe)
    attach([fp8], None, FoldPolicy())
    x = torch.randn(4, 2, H, generator=torch.Generator().manual_seed(6))
    before = fp8(x)[0].detach()
    for vec in fp8.input_scales.values():
        for p in vec.parameters():
            p.data.mul_(1.7)
    ref.load_state_dict(fp8.state_dict())
    assert torch.equal(fp8(x)[0], before) and fp8.fp8_weights.casts == 1  # same generation: the step's cast
    training_hooks.after_parameters_changed([fp8])
    assert rel(fp8(x)[0], ref(x)[0]) < BOUND[recipe.forward_dtype]
    assert fp8.fp8_weights.casts == 2


def test_shapes_not_divisible_by_16_are_refused(megatron_single_rank):
    cfg = _config()
    with pytest.raises(FP8Unsupported, match="divisible by 16.*output_features 40"):
        FP8ColumnParallelLinear(
            H, 40, config=cfg, init_method=cfg.init_method, bias=False, gather_output=False, fp8=FP8Recipe()
        )
    with pytest.raises(FP8Unsupported, match="input_features 24"):
        FP8RowParallelLinear(
            24,
            H,
            config=cfg,
            init_method=cfg.init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            fp8=FP8Recipe(),
        )


def test_gpus_without_fp8_are_refused():
    for cap in [(8, 0), (8, 6), (7, 5)]:
        with pytest.raises(FP8Unsupported, match=r"compute capability >= 8\.9"):
            check_fp8_capability(cap, "an A100")
    for cap in [(8, 9), (9, 0), (10, 0)]:
        check_fp8_capability(cap)


def test_bad_recipe_names_are_refused():
    with pytest.raises(FP8Unsupported, match="--fp8-recipe"):
        FP8Recipe("hybrid", "delayed")
    with pytest.raises(FP8Unsupported, match="--fp8-format"):
        FP8Recipe("e5m2", "tensorwise")


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_tensorwise_matches_torchao_float8_linear(megatron_single_rank, fmt):
    """torchao's Float8Linear (the tensorwise recipe, the same dynamic scaling) is an independent oracle."""
    torchao_float8 = pytest.importorskip("torchao.float8")
    recipe = FP8Recipe(fmt, "tensorwise")
    fp8, _ = _pair(FP8ColumnParallelLinear, ColumnParallelLinear, recipe, H, 48, _config())
    lin = torch.nn.Linear(H, 48, bias=False)
    lin.weight.data.copy_(fp8.weight.data)
    cast = torchao_float8.CastConfig(target_dtype=recipe.grad_dtype)
    config = torchao_float8.Float8LinearConfig(cast_config_grad_output=cast)
    ao = torchao_float8.convert_to_float8_training(torch.nn.Sequential(lin), config=config)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, H, generator=gen, requires_grad=True)
    x_ao = x.detach().clone().requires_grad_()
    dy = torch.randn(16, 48, generator=gen)
    y, _ = fp8(x)
    y_ao = ao(x_ao)
    (y * dy).sum().backward()
    (y_ao * dy).sum().backward()
    torch.testing.assert_close(y, y_ao, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ao.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8.weight.grad, ao[0].weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", [RECIPES[1], RECIPES[3]], ids=lambda r: f"{r.format}-{r.scaling}")
def test_an_expert_without_tokens(megatron_single_rank, recipe):
    """Top-k routing can leave an MoE expert without tokens: empty output, zero weight gradient."""
    fp8, _ = _pair(FP8RowParallelLinear, RowParallelLinear, recipe, H, 48, _config())
    x = torch.zeros(0, H, requires_grad=True)
    y, _ = fp8(x)
    y.sum().backward()
    assert y.shape == (0, 48) and x.grad.shape == (0, H)
    assert fp8.weight.grad.shape == fp8.weight.shape and not fp8.weight.grad.any()


def test_compiled_casts_equal_eager(monkeypatch):
    """On CUDA the amax and cast kernels run through torch.compile: same bits and scales as eager
    (checked here with the CPU compiler; MEGATRON_SV_FUSED_KERNELS=compiled forces it on CPU)."""
    x = (torch.randn(48, 32, generator=torch.Generator().manual_seed(8)) * 3).to(torch.bfloat16).t()
    eager = [quantize(x, torch.float8_e4m3fn, rowwise) for rowwise in (False, True)]
    monkeypatch.setenv("MEGATRON_SV_FUSED_KERNELS", "compiled")
    for rowwise, want in zip((False, True), eager):
        got = quantize(x, torch.float8_e4m3fn, rowwise)
        assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
        assert torch.equal(got.inv_scale, want.inv_scale) and got.data.is_contiguous()
