"""The scale-vector strategies compute the same training run at every parallel layout.

For `unified` and each single component: losses over 3 optimizer steps match TP1 at TP2, TP2+SP, PP2
(2 micro-batches) and DP2 with the distributed optimizer; MoE matches at EP1 vs EP2; replicated vectors'
gradients are equal on all TP ranks; checkpoints saved at TP2/PP2/EP2 load at TP1 with identical logits.
All configurations of one world size run inside one spawned job to keep start-up costs low.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.parity import SEQ, VOCAB, train_steps

STRATEGIES = ["standard", "hg", "dp", "dnp", "or", "er", "iwd", "unified"]
LAYOUTS = {
    "tp2": dict(parallel={"tp": 2}, micro_batch_size=2, num_microbatches=1),
    "tp2_sp": dict(parallel={"tp": 2, "sp": True}, micro_batch_size=2, num_microbatches=1),
    "pp2": dict(parallel={"pp": 2}, micro_batch_size=1, num_microbatches=2),
    "dp2_distopt": dict(parallel={}, micro_batch_size=1, num_microbatches=1, use_distributed_optimizer=True),
}
REFERENCE = dict(parallel={}, micro_batch_size=2, num_microbatches=1)


def build_sv_model(parallel, strategy: str, moe: bool = False, seed: int = 42, fold_once_per_step: bool = False):
    from megatron_sv.models.gpt.model import GPTShape, ParallelLayout, build_gpt_model, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config

    shape = GPTShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
                     seq_length=SEQ, ffn_hidden_size=48, num_experts=4 if moe else None, moe_router_topk=2)
    layout = ParallelLayout(tensor_model_parallel_size=parallel.get("tp", 1),
                            pipeline_model_parallel_size=parallel.get("pp", 1),
                            sequence_parallel=parallel.get("sp", False),
                            expert_model_parallel_size=parallel.get("ep", 1))
    config = transformer_config(shape, layout)
    sv = strategy_config(strategy, fold_once_per_step=fold_once_per_step)
    return config, build_gpt_model(shape, sv, config, init_seed=seed)


def _is_replicated_vector(name: str, param) -> bool:
    return getattr(param, "sv_role", None) is not None and not getattr(param, "tensor_model_parallel", False)


def _job(rank, world_size, runs):
    """Run every (key, strategy, moe, run kwargs) of ``runs`` on this world; return losses and grads."""
    from megatron_sv.platform import destroy_distributed

    out = {}
    for key, strategy, moe, kwargs in runs:
        kwargs = dict(kwargs)
        parallel = kwargs.pop("parallel")
        step_fold = kwargs.pop("fold_once_per_step", False)
        res = train_steps(parallel, build_model=functools.partial(build_sv_model, strategy=strategy, moe=moe,
                                                                  fold_once_per_step=step_fold),
                          collect_grads=_is_replicated_vector, steps=3, keep_process_group=True,
                          optimizer_overrides=functools.partial(_overrides, strategy), **kwargs)
        out[key] = {"losses": res["losses"], "grads": res["grads"]}
    destroy_distributed()
    return out


def _overrides(strategy):
    from megatron_sv.scale_vectors.config import strategy_config
    from megatron_sv.scale_vectors.param_groups import scale_vector_config_overrides

    return scale_vector_config_overrides(strategy_config(strategy))


@pytest.fixture(scope="module")
def dense_results():
    ref_runs = [(("ref", s), s, False, REFERENCE) for s in STRATEGIES]
    ref = run_distributed(_job, world_size=1, args=(ref_runs,), timeout=600)[0]
    runs = [((layout, s), s, False, kw) for layout, kw in LAYOUTS.items() for s in STRATEGIES]
    per_rank = run_distributed(_job, world_size=2, args=(runs,), timeout=900)
    return ref, per_rank


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_losses_match_single_rank(dense_results, layout, strategy):
    ref, per_rank = dense_results
    expected = ref[("ref", strategy)]["losses"]
    got = per_rank[0][(layout, strategy)]["losses"]
    assert expected[0] != expected[-1]  # training moved
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replicated_vector_grads_equal_on_tp_ranks(dense_results, layout, strategy):
    _, per_rank = dense_results
    g0, g1 = per_rank[0][(layout, strategy)]["grads"], per_rank[1][(layout, strategy)]["grads"]
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert torch.any(g0[name] != 0), name
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def moe_results():
    ep1 = run_distributed(_job, world_size=1, args=([(("ep1", s), s, True, REFERENCE) for s in STRATEGIES],),
                          timeout=600)[0]
    ep2_kwargs = dict(parallel={"ep": 2}, micro_batch_size=1, num_microbatches=1)
    ep2 = run_distributed(_job, world_size=2, args=([(("ep2", s), s, True, ep2_kwargs) for s in STRATEGIES],),
                          timeout=900)
    return ep1, ep2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_moe_ep2_matches_ep1(moe_results, strategy):
    ep1, ep2 = moe_results
    expected = ep1[("ep1", strategy)]["losses"]
    assert expected[0] != expected[-1]
    torch.testing.assert_close(torch.tensor(ep2[0][("ep2", strategy)]["losses"]), torch.tensor(expected),
                               rtol=2e-5, atol=2e-6)


FOLD_STEP = dict(fold_once_per_step=True)


@pytest.mark.parametrize("strategy", ["dp", "unified"])
def test_fold_once_per_step_matches_per_micro_batch(strategy):
    """Folding once per optimizer step (gradient accumulated on W_eff, chain rule applied before the
    reduction) trains exactly like folding per micro-batch: 4 micro-batches on one rank, and PP2 / TP2+SP."""
    ref = run_distributed(_job, world_size=1, args=([
        ("micro", strategy, False, dict(parallel={}, micro_batch_size=1, num_microbatches=2)),
        ("step", strategy, False, dict(parallel={}, micro_batch_size=1, num_microbatches=2, **FOLD_STEP)),
    ],), timeout=600)[0]
    got = run_distributed(_job, world_size=2, args=([
        ("pp2", strategy, False, dict(parallel={"pp": 2}, micro_batch_size=1, num_microbatches=2, **FOLD_STEP)),
        ("tp2", strategy, False, dict(parallel={"tp": 2, "sp": True}, micro_batch_size=1, num_microbatches=2,
                                      **FOLD_STEP)),
    ],), timeout=600)
    expected = torch.tensor(ref["micro"]["losses"])
    torch.testing.assert_close(torch.tensor(ref["step"]["losses"]), expected, rtol=2e-5, atol=2e-6)
    for key in ("pp2", "tp2"):
        torch.testing.assert_close(torch.tensor(got[-1][key]["losses"]), expected, rtol=2e-5, atol=2e-6)
    for name in got[0]["tp2"]["grads"]:  # replicated vectors' grads equal on both TP ranks
        torch.testing.assert_close(got[0]["tp2"]["grads"][name], got[1]["tp2"]["grads"][name])
