"""SDPACoreAttention against a naive softmax(Q K^T / sqrt(d)) V, causal, with GQA."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_sv.models.gpt.reference_model import reference_config
from megatron_sv.platform import current_device, destroy_distributed, initialize_distributed
from megatron_sv.platform.attention import SDPACoreAttention
from tests.helpers.distributed import find_free_port, run_distributed


@pytest.fixture
def single_rank(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    initialize_distributed(seed=0)
    yield
    destroy_distributed()


def naive_attention(q, k, v, causal=True, mask=None):
    # q [s, b, np, d], k/v [s, b, ng, d]
    np_, ng = q.shape[2], k.shape[2]
    k = k.repeat_interleave(np_ // ng, dim=2)
    v = v.repeat_interleave(np_ // ng, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    if causal:
        s, t = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(s, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _qkv(sq=16, b=2, np_=4, ng=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, np_, d, generator=g)
    k = torch.randn(sq, b, ng, d, generator=g)
    v = torch.randn(sq, b, ng, d, generator=g)
    return q, k, v


def test_causal_gqa_matches_naive(single_rank):
    config = reference_config(hidden_size=64, num_attention_heads=4, num_query_groups=2)
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = attn(q, k, v, None)
    assert out.shape == (16, 2, 64)
    ref = naive_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_padding_mask_matches_naive(single_rank):
    config = reference_config(hidden_size=64, num_attention_heads=4, num_query_groups=4)
    attn = SDPACoreAttention(config, 1, AttnMaskType.padding, "self")
    q, k, v = _qkv(ng=4)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[0, :, :, 12:] = True  # Megatron convention: True = masked out
    out = attn(q, k, v, mask)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=False, mask=mask), rtol=1e-5, atol=1e-5)


def test_dropout_uses_rng_tracker(single_rank):
    from megatron.core import tensor_parallel

    config = reference_config(attention_dropout=0.5)
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    # on the device whose generator the tracker forks (the CUDA one on GPUs)
    q, k, v = (t.to(current_device()) for t in _qkv())
    state = tensor_parallel.get_cuda_rng_tracker().get_states()
    saved = {n: s.clone() for n, s in state.items()}
    out1 = attn(q, k, v, None)
    tensor_parallel.get_cuda_rng_tracker().set_states(saved)
    out2 = attn(q, k, v, None)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # same tracker state, same mask
    assert not torch.allclose(out1, naive_attention(q, k, v))  # dropout happened
    attn.eval()
    torch.testing.assert_close(attn(q, k, v, None), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)


def _tp2_attention(rank, world_size):
    initialize_distributed(tensor_model_parallel_size=2, seed=0)
    try:
        config = reference_config(tensor_model_parallel_size=2, num_attention_heads=4, num_query_groups=2)
        attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
        q, k, v = _qkv()
        # this rank's heads: query heads [2r, 2r+1], kv group [r]
        out = attn(q[:, :, 2 * rank : 2 * rank + 2], k[:, :, rank : rank + 1], v[:, :, rank : rank + 1], None)
        return attn.num_heads_per_partition, out
    finally:
        destroy_distributed()


def test_tensor_parallel_heads_match_full_attention():
    results = run_distributed(_tp2_attention, world_size=2)
    q, k, v = _qkv()
    full = naive_attention(q, k, v)
    for heads, _ in results:
        assert heads == 2
    torch.testing.assert_close(torch.cat([r[1] for r in results], dim=-1), full, rtol=1e-5, atol=1e-5)
