"""The scale-vector strategies compute the same training run at every parallel layout.

For `unified` and each single component: losses over 3 optimizer steps match TP1 at TP2, TP2+SP, PP2
(2 micro-batches) and DP2 with the distributed optimizer; MoE matches at EP1 vs EP2 and at TP2+SP;
replicated vectors' gradients are equal on all TP ranks. Losses alone cannot see a doubled or missing
gradient reduction (Adam and clipping are invariant to a gradient's scale), so every parameter's reduced
gradient after the first backward (weights and every scale vector, gathered to its global shape by its
checkpoint map) is compared with the single-rank run too, and a planted doubled / missing TP reduction of
the replicated vectors must make that comparison fail. All configurations of one world size run inside
one spawned job to keep start-up costs low.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.distributed import run_side_by_side
from tests.helpers.parity import layout_of, tiny_gpt_shape, train_steps

STRATEGIES = ["standard", "hg", "dp", "dnp", "or", "er", "iwd", "unified"]
LAYOUTS = {
    "tp2": dict(parallel={"tp": 2}, micro_batch_size=2, num_microbatches=1),
    "tp2_sp": dict(parallel={"tp": 2, "sp": True}, micro_batch_size=2, num_microbatches=1),
    "pp2": dict(parallel={"pp": 2}, micro_batch_size=1, num_microbatches=2),
    "dp2_distopt": dict(parallel={}, micro_batch_size=1, num_microbatches=1, use_distributed_optimizer=True),
}
REFERENCE = dict(parallel={}, micro_batch_size=2, num_microbatches=1)
PLANTED = ["hg", "unified"]  # strategies with replicated branch vectors, run with a planted reduction error


def build_sv_model(parallel, strategy: str, moe: bool = False, seed: int = 42, fold_once_per_step: bool = False):
    from megatron_sv.models.gpt.model import build_gpt_model, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config

    shape = tiny_gpt_shape(moe)
    layout = layout_of(parallel)
    config = transformer_config(shape, layout)
    sv = strategy_config(strategy, fold_once_per_step=fold_once_per_step)
    return config, build_gpt_model(shape, sv, config, init_seed=seed)


def _is_replicated_vector(name: str, param) -> bool:
    return getattr(param, "sv_role", None) is not None and not getattr(param, "tensor_model_parallel", False)


def _planted_tp_reduction(kind: str):
    """A wrong gradient reduction for every replicated scale vector: 'double' all-reduces it twice (the
    gradient counted TP times too often), 'missing' not at all (each rank keeps its partial sum)."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    if kind == "double":
        return lambda t, group: copy_to_tensor_model_parallel_region(
            copy_to_tensor_model_parallel_region(t, group=group), group=group
        )
    return lambda t, group: t


def _decayed_params(strategy):
    from megatron_sv.scale_vectors.config import strategy_config
    from megatron_sv.scale_vectors.param_groups import decays

    sv = strategy_config(strategy)
    return lambda module: {n: decays(sv, p, n) for n, p in module.named_parameters()}


def _job(rank, world_size, runs):
    """Run every (key, strategy, moe, run kwargs) of ``runs`` on this world; return losses and grads
    (rank 0 also returns every parameter's full reduced gradient of the first step, the same on all ranks)."""
    from megatron_sv.platform import destroy_distributed
    from megatron_sv.scale_vectors import vector

    out = {}
    for key, strategy, moe, kwargs in runs:
        kwargs = dict(kwargs)
        parallel = kwargs.pop("parallel")
        step_fold = kwargs.pop("fold_once_per_step", False)
        plant = kwargs.pop("plant", None)
        steps = kwargs.pop("steps", 3)
        single_rank = world_size == 1
        original = vector.sum_grad_over_tp
        if plant is not None:
            vector.sum_grad_over_tp = _planted_tp_reduction(plant)
        try:
            res = train_steps(
                parallel,
                build_model=functools.partial(build_sv_model, strategy=strategy, moe=moe, fold_once_per_step=step_fold),
                collect_grads=(lambda n, p: True) if single_rank else _is_replicated_vector,
                steps=steps,
                keep_process_group=True,
                full_grads=True,
                finish=_decayed_params(strategy) if single_rank else None,
                optimizer_overrides=functools.partial(_overrides, strategy),
                **kwargs,
            )
        finally:
            vector.sum_grad_over_tp = original
        out[key] = {
            "losses": res["losses"],
            "grads": res["grads"],
            "full_grads": res["full_grads"] if rank == 0 else None,
            "decayed": res.get("finish"),
        }
    destroy_distributed()
    return out


def grad_mismatches(got, expected, rtol=1e-5):
    """Names of the parameters whose gathered gradient differs from the reference by more than ``rtol``
    of the reference's norm (a relative check per tensor: a doubled or halved vector gradient is off by 100%
    or 50%, reduction-order noise in fp32 by about 1e-7)."""
    assert got.keys() == expected.keys(), set(got) ^ set(expected)
    bad = []
    for name, ref in expected.items():
        err = (got[name] - ref).norm()
        if not err <= rtol * ref.norm() + 1e-12:
            bad.append(f"{name} (relative error {float(err / ref.norm().clamp(min=1e-30)):.1e})")
    return bad


def _overrides(strategy):
    from megatron_sv.scale_vectors.config import strategy_config
    from megatron_sv.scale_vectors.param_groups import scale_vector_config_overrides

    return scale_vector_config_overrides(strategy_config(strategy))


@pytest.fixture(scope="module")
def dense_results():
    fold_one, fold_two = _fold_runs()
    ref_runs = [(("ref", s), s, False, REFERENCE) for s in STRATEGIES] + fold_one
    runs = [((layout, s), s, False, kw) for layout, kw in LAYOUTS.items() for s in STRATEGIES] + fold_two
    runs += [
        ((f"tp2_{plant}", s), s, False, dict(LAYOUTS["tp2"], plant=plant, steps=1))
        for plant in ("double", "missing")
        for s in PLANTED
    ]
    ref, per_rank = run_side_by_side(
        dict(fn=_job, world_size=1, args=(ref_runs,), timeout=900),
        dict(fn=_job, world_size=2, args=(runs,), timeout=900),
    )
    return ref[0], per_rank


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_losses_match_single_rank(dense_results, layout, strategy):
    ref, per_rank = dense_results
    expected = ref[("ref", strategy)]["losses"]
    got = per_rank[0][(layout, strategy)]["losses"]
    assert expected[0] != expected[-1]  # training moved
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_gradient_matches_single_rank(dense_results, layout, strategy):
    ref, per_rank = dense_results
    expected = ref[("ref", strategy)]["full_grads"]
    assert len(expected) >= 8 and all(g.norm() > 0 for g in expected.values())
    assert grad_mismatches(per_rank[0][(layout, strategy)]["full_grads"], expected) == []


@pytest.mark.parametrize("plant", ["double", "missing"])
def test_gradient_check_sees_a_planted_tp_reduction_error(dense_results, plant):
    """The check above is not blind: a doubled or missing TP reduction of the replicated vectors fails it
    (while the losses of the first step are unchanged, so a loss comparison cannot see it)."""
    ref, per_rank = dense_results
    for strategy in PLANTED:
        got = per_rank[0][(f"tp2_{plant}", strategy)]
        bad = grad_mismatches(got["full_grads"], ref[("ref", strategy)]["full_grads"])
        assert bad and all("scale" in name for name in bad), (strategy, bad)
        assert got["losses"][0] == pytest.approx(ref[("ref", strategy)]["losses"][0], rel=2e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_decayed_parameter_lacks_a_gradient(dense_results, strategy):
    """A parameter that weight decay shrinks must be one the loss can push back: no decayed parameter has a
    (numerically) zero gradient. Under dnp/unified with or/er the input-side magnitudes before the inner
    norms used to (|g| ~ 1e-7); they are no longer parameters."""
    ref, _ = dense_results
    run = ref[("ref", strategy)]
    norms = {n: float(g.norm()) for n, g in run["grads"].items()}
    typical = sorted(norms.values())[len(norms) // 2]
    starved = [f"{n} (|g| {norms[n]:.1e})" for n, d in run["decayed"].items() if d and norms[n] <= 1e-4 * typical]
    assert starved == []


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
    runs = [((layout, s), s, True, kw) for layout, kw in MOE_LAYOUTS.items() for s in STRATEGIES]
    ep1, got = run_side_by_side(
        dict(fn=_job, world_size=1, args=([(("ep1", s), s, True, REFERENCE) for s in STRATEGIES],), timeout=900),
        dict(fn=_job, world_size=2, args=(runs,), timeout=900),
    )
    return ep1[0], got


MOE_LAYOUTS = {
    "ep2": dict(parallel={"ep": 2}, micro_batch_size=1, num_microbatches=1),
    # the router is replicated and reads sequence-sharded tokens: its TP reduction matters here
    "tp2_sp": dict(parallel={"tp": 2, "sp": True}, micro_batch_size=2, num_microbatches=1),
}


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_moe_matches_ep1(moe_results, layout, strategy):
    ep1, got = moe_results
    expected = ep1[("ep1", strategy)]["losses"]
    assert expected[0] != expected[-1]
    torch.testing.assert_close(
        torch.tensor(got[0][(layout, strategy)]["losses"]), torch.tensor(expected), rtol=2e-5, atol=2e-6
    )
    assert grad_mismatches(got[0][(layout, strategy)]["full_grads"], ep1[("ep1", strategy)]["full_grads"]) == []


FOLD_STEP = dict(fold_once_per_step=True)


FOLD_STRATEGIES = ["dp", "unified"]


def _fold_runs():
    """The --sv-fold-once-per-step runs (of test_fold_once_per_step_matches_per_micro_batch), in the dense
    fixture's jobs: (single-rank runs, two-rank runs)."""
    mb2 = dict(micro_batch_size=1, num_microbatches=2)
    one = [(("fold_micro", s), s, False, dict(parallel={}, **mb2)) for s in FOLD_STRATEGIES]
    one += [(("fold_step", s), s, False, dict(parallel={}, **mb2, **FOLD_STEP)) for s in FOLD_STRATEGIES]
    two = [(("fold_pp2", s), s, False, dict(parallel={"pp": 2}, **mb2, **FOLD_STEP)) for s in FOLD_STRATEGIES]
    two += [
        (("fold_tp2", s), s, False, dict(parallel={"tp": 2, "sp": True}, **mb2, **FOLD_STEP)) for s in FOLD_STRATEGIES
    ]
    return one, two


@pytest.mark.parametrize("strategy", FOLD_STRATEGIES)
def test_fold_once_per_step_matches_per_micro_batch(dense_results, strategy):
    """The fp32 cached fold once per optimizer step (--sv-fold-once-per-step: dL/dW_eff accumulated in
    main_grad, chain rule once per step after the reduction) trains exactly like folding per micro-batch:
    2 micro-batches on one rank, and PP2 / TP2+SP."""
    ref, per_rank = dense_results
    ref = {k: ref[(f"fold_{k}", strategy)] for k in ("micro", "step")}
    got = [{k: r[(f"fold_{k}", strategy)] for k in ("pp2", "tp2")} for r in per_rank]
    expected = torch.tensor(ref["micro"]["losses"])
    torch.testing.assert_close(torch.tensor(ref["step"]["losses"]), expected, rtol=2e-5, atol=2e-6)
    for key in ("pp2", "tp2"):
        torch.testing.assert_close(torch.tensor(got[-1][key]["losses"]), expected, rtol=2e-5, atol=2e-6)
    for name in got[0]["tp2"]["grads"]:  # replicated vectors' grads equal on both TP ranks
        torch.testing.assert_close(got[0]["tp2"]["grads"][name], got[1]["tp2"]["grads"][name])
