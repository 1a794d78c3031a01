"""CUDA checks (marker ``cuda``; skipped only where CUDA is absent). With Transformer Engine present they
compare the TE backend with the local one; without it they check the TE request fails clearly."""

import pytest
import torch

from megatron_sv.models.gpt.backends import transformer_engine_backend
from megatron_sv.models.gpt.model import GPTShape, ParallelLayout, build_gpt_model, transformer_config
from megatron_sv.scale_vectors import te_linears as tl
from megatron_sv.scale_vectors.config import strategy_config

pytestmark = pytest.mark.cuda

SHAPE = GPTShape(
    num_layers=2,
    hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    seq_length=64,
    ffn_hidden_size=256,
)


def _model(strategy, impl="local", bf16=False, seed=1234, **cfg):
    torch.manual_seed(seed)
    config = transformer_config(SHAPE, ParallelLayout(bf16=bf16), **cfg)
    return build_gpt_model(SHAPE, strategy_config(strategy), config, init_seed=seed, transformer_impl=impl).cuda()


def _data():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_length + 1), generator=g).cuda()
    return t[:, :-1], torch.arange(SHAPE.seq_length, device="cuda")[None], t[:, 1:]


def test_nccl_and_cuda_are_selected(megatron_single_rank):
    from megatron_sv.platform.device import select_backend

    assert select_backend() == ("nccl", "cuda")
    assert torch.distributed.get_backend() == "nccl"


@pytest.mark.parametrize("strategy", ["standard", "unified", "dp", "er"])
def test_local_backend_trains_on_cuda(megatron_single_rank, strategy):
    model = _model(strategy, bf16=True)
    assert all(p.is_cuda for p in model.parameters())
    tokens, pos, labels = _data()
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_local_cuda_matches_folding_reference(megatron_single_rank):
    """On CUDA, strategies without inner norms still compute standard's function at init (fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens, pos, _ = _data()
    with torch.no_grad():
        ref = _model("standard")(tokens, pos, None)
        for s in ("hg", "dp", "or", "er"):
            assert torch.allclose(_model(s)(tokens, pos, None), ref, rtol=1e-4, atol=1e-4), s


@pytest.mark.parametrize("strategy", ["standard", "unified"])
def test_transformer_engine_backend(megatron_single_rank, strategy):
    ok, reason = tl.transformer_engine_status()
    if not ok:
        with pytest.raises(tl.TransformerEngineUnavailable, match="Transformer Engine"):
            _model(strategy, impl="transformer_engine")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens, pos, labels = _data()
    local = _model(strategy, seed=1)
    te = _model(strategy, impl="transformer_engine", seed=2)
    # one checkpoint schema: same keys; a local state dict loads strictly into the TE model and back
    local_sd, te_sd = local.state_dict(), te.state_dict()
    assert set(te_sd) == set(local_sd)
    te.load_state_dict(local_sd, strict=True)
    with torch.no_grad():
        ref = local(tokens, pos, None)
        out = te(tokens, pos, None)
    assert torch.allclose(out, ref, rtol=2e-3, atol=2e-3), (out - ref).abs().max()
    fresh = _model(strategy, seed=3)
    fresh.load_state_dict(te.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(tokens, pos, None), ref)
    # gradients reach every scale vector through TE's GEMM on the folded weight
    te.zero_grad(set_to_none=True)
    te(tokens, pos, None, labels=labels).float().mean().backward()
    for name, p in te.named_parameters():
        if getattr(p, "sv_role", None) is not None:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_transformer_engine_fp8_step(megatron_single_rank):
    ok, _ = tl.transformer_engine_status()
    if not ok:
        with pytest.raises(tl.TransformerEngineUnavailable):
            transformer_engine_backend()
        return
    model = _model("unified", impl="transformer_engine", bf16=True, fp8="hybrid", fp8_recipe="tensorwise")
    tokens, pos, labels = _data()
    model.set_is_first_microbatch()
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
