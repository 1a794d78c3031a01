"""Folding once per optimizer step (step_fold.py) and bf16 mixed precision at every parallel layout.

Oracles:
* bf16 (the weight holds W_eff, written at the optimizer's master -> model copy; chain rule once per step
  on the fp32 main_grad) at TP2+SP, PP2, EP2 and DP2 + distributed optimizer trains like the TP1 bf16 run;
* every parameter's gradient (weights and every scale vector) under bf16 matches the fp32 reference
  within bf16 error, at TP1 and under the distributed optimizer (where the chain rule works on shards and
  the vectors' partial sums need the DP all-reduce);
* the bf16 step fold agrees with bf16 per-micro-batch folding; the fp32 cached step fold equals the fp32
  per-micro-batch fold;
* planted bugs (a skipped DP all-reduce of the vectors' partial sums, a weight left stale after the
  parameters changed) make these checks fail.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.parity import SEQ, VOCAB, train_steps

# A real bug changes a gradient by a factor (double / missing reduction: >= 0.5 relative) or uses a stale
# weight (loss off by > 1e-2 after one update at lr 1e-2); bf16 rounding (8 bits of mantissa) moves a
# gradient by about 2^-8 relative per rounded operand, accumulated over a few operands and reductions.
GRAD_REL_BF16 = 0.05  # |g_bf16 - g_fp32| / |g_fp32| per tensor
LOSS_ABS_BF16 = 2e-3  # bf16 layouts vs the TP1 bf16 run (same rounding path up to reduction order)


def _build(parallel, strategy: str, bf16: bool, moe: bool = False, fold_once_per_step: bool = False):
    from megatron_sv.models.gpt.model import GPTShape, ParallelLayout, build_gpt_model, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config

    shape = GPTShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
                     seq_length=SEQ, ffn_hidden_size=48, num_experts=4 if moe else None, moe_router_topk=2)
    layout = ParallelLayout(tensor_model_parallel_size=parallel.get("tp", 1),
                            pipeline_model_parallel_size=parallel.get("pp", 1),
                            sequence_parallel=parallel.get("sp", False),
                            expert_model_parallel_size=parallel.get("ep", 1), bf16=bf16)
    config = transformer_config(shape, layout)
    sv = strategy_config(strategy, fold_once_per_step=fold_once_per_step)
    return config, build_gpt_model(shape, sv, config, init_seed=42)


def _randomize_vectors(model):
    """Scale vectors away from their init of 1 (where W_eff == W and a missing fold is invisible), the same
    values at every layout: drawn from the vector's global name (pipeline stages number layers locally)."""
    import zlib

    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_sv.scale_vectors.vector import ScaleVector

    global_prefix = {f"{n}.": f"decoder.layers.{m.layer_number - 1}." for n, m in model.named_modules()
                     if isinstance(m, TransformerLayer)}
    for name, m in model.named_modules():
        if not isinstance(m, ScaleVector) or ".experts." in name:
            continue
        for local, glob in global_prefix.items():
            if name.startswith(local):
                name = glob + name[len(local):]
                break
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        m.set_value(0.5 + torch.rand(m.spec.size, generator=gen))


def _overrides(strategy):
    from megatron_sv.scale_vectors.config import strategy_config
    from megatron_sv.scale_vectors.param_groups import scale_vector_config_overrides

    return scale_vector_config_overrides(strategy_config(strategy))


def _plans(model):
    return sorted({m.step_fold.plan for m in model.modules() if hasattr(m, "step_fold") and m._folds()})


def _plant(name):
    """Switch on a deliberate bug inside the spawned job (mutation tests); returns the undo."""
    from megatron_sv.scale_vectors import step_fold

    if name is None:
        return lambda: None
    cls, attr, bad = {
        # the vectors' gradient partial sums are not completed over the DP ranks of a sharded weight
        "no_dp_partial_sum": (step_fold.StepFolder, "_sum_partials", staticmethod(lambda pending: None)),
        # the cached fold is reused after the parameters changed (the old key on _version, which writes
        # through .data / the parameter all-gather do not bump)
        "stale_cache": (step_fold.StepFoldState, "cache_is_fresh", lambda self: self.cache is not None),
        # the optimizer's copy writes W but nothing folds it: the model weight is not W_eff
        "no_fold_at_copy": (step_fold.StepFolder, "fold_from_masters",
                            lambda self, linears: [setattr(m.step_fold, "weight_holds_fold", True) for m in linears]),
    }[name]
    original = cls.__dict__[attr]
    setattr(cls, attr, bad)
    extra = []
    if name == "stale_cache":
        extra = [(step_fold.StepFoldState, "release_cache", step_fold.StepFoldState.__dict__["release_cache"])]
        step_fold.StepFoldState.release_cache = lambda self: None

    def undo():
        setattr(cls, attr, original)
        for c, a, o in extra:
            setattr(c, a, o)
    return undo


def _job(rank, world_size, runs):
    from megatron_sv.platform import destroy_distributed
    from megatron_sv.scale_vectors.step_fold import FoldPolicy

    out = {}
    for key, strategy, kw in runs:
        kw = dict(kw)
        parallel = kw.pop("parallel")
        bf16 = kw.pop("bf16", False)
        moe = kw.pop("moe", False)
        mode = kw.pop("fold", "auto")
        undo = _plant(kw.pop("plant", None))
        plans = []
        res = train_steps(parallel, build_model=functools.partial(_build, strategy=strategy, bf16=bf16, moe=moe,
                                                                  fold_once_per_step=(mode == "step")),
                          collect_grads=lambda n, p: True, steps=3, model_hook=_randomize_vectors, keep_process_group=True, bf16=bf16,
                          fold_policy=FoldPolicy(mode="micro_batch" if mode == "micro_batch" else "auto"),
                          optimizer_overrides=functools.partial(_overrides, strategy),
                          finish=lambda m: plans.append(_plans(m)), **kw)
        undo()
        out[key] = {"losses": res["losses"], "grads": res["grads"], "plans": plans[0]}
    destroy_distributed()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _by_tensor(grads, names):
    """One entry per weight and per scale vector: an OR/ER vector's magnitude and direction together (the
    magnitude's gradient alone is a cancelling sum whose relative error says nothing about bf16)."""
    out = {}
    for n in names:
        key = n.rsplit(".", 1)[0] if n.endswith(("magnitude", "direction")) else n
        out.setdefault(key, []).append(grads[n].reshape(-1).float())
    return {k: torch.cat(v) for k, v in out.items()}


def _assert_grads_close(got, ref, rel, names=None):
    names = list(names if names is not None else ref.keys())
    got, ref = _by_tensor(got, names), _by_tensor(ref, names)
    bad = {n: _rel(got[n], ref[n]) for n in ref if _rel(got[n], ref[n]) > rel}
    assert not bad, f"gradients off by more than {rel} relative: {bad}"


STRATEGIES = ["hg", "dp", "unified"]
TP1 = dict(parallel={}, micro_batch_size=1, num_microbatches=2)
LAYOUTS = {
    "tp2_sp": dict(parallel={"tp": 2, "sp": True}, micro_batch_size=1, num_microbatches=2),
    "pp2": dict(parallel={"pp": 2}, micro_batch_size=1, num_microbatches=2),
    "dp2_distopt": dict(parallel={}, micro_batch_size=1, num_microbatches=1, use_distributed_optimizer=True),
    # one bucket per parameter (tiny buckets), each sharded over both ranks: every folded weight is split
    # mid-row between the ranks; reduction and parameter all-gather overlap with compute
    "dp2_distopt_overlap": dict(parallel={}, micro_batch_size=1, num_microbatches=1, use_distributed_optimizer=True,
                                ddp_overrides=dict(overlap_grad_reduce=True, overlap_param_gather=True,
                                                   bucket_size=1)),
}


@pytest.fixture(scope="module")
def results():
    one = []
    for s in STRATEGIES:
        one += [(("fp32", s), s, dict(TP1, fold="micro_batch")),
                (("bf16", s), s, dict(TP1, bf16=True)),
                (("bf16_micro", s), s, dict(TP1, bf16=True, fold="micro_batch")),
                (("fp32_step", s), s, dict(TP1, fold="step"))]
    one += [(("bf16_moe", "unified"), "unified", dict(TP1, bf16=True, moe=True))]
    ref = run_distributed(_job, world_size=1, args=(one,), timeout=900)[0]
    two = [((name, s), s, dict(kw, bf16=True)) for name, kw in LAYOUTS.items() for s in STRATEGIES]
    two += [(("ep2", "unified"), "unified", dict(parallel={"ep": 2}, micro_batch_size=1, num_microbatches=1,
                                                 bf16=True, moe=True))]
    return ref, run_distributed(_job, world_size=2, args=(two,), timeout=900)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_folds_at_the_copy_and_matches_fp32_gradients(results, strategy):
    ref, _ = results
    assert ref[("bf16", strategy)]["plans"] == ["master"]
    assert ref[("bf16_micro", strategy)]["plans"] == ["micro_batch"]
    fp32, bf16 = ref[("fp32", strategy)], ref[("bf16", strategy)]
    assert set(bf16["grads"]) == set(fp32["grads"])
    vectors = [n for n in fp32["grads"] if "scales" in n]
    assert vectors, "no folded scale vectors in the model"
    _assert_grads_close(bf16["grads"], fp32["grads"], GRAD_REL_BF16)
    # the per-micro-batch fold in bf16 is within the same error of fp32: the step fold is no worse
    _assert_grads_close(ref[("bf16_micro", strategy)]["grads"], fp32["grads"], GRAD_REL_BF16)
    torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"]), rtol=0, atol=2e-2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp32_cached_step_fold_equals_per_micro_batch(results, strategy):
    ref, _ = results
    assert ref[("fp32_step", strategy)]["plans"] == ["cached"]
    step, micro = ref[("fp32_step", strategy)], ref[("fp32", strategy)]
    torch.testing.assert_close(torch.tensor(step["losses"]), torch.tensor(micro["losses"]), rtol=2e-5, atol=2e-6)
    for n in micro["grads"]:
        torch.testing.assert_close(step["grads"][n], micro["grads"][n], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_layouts_match_tp1_bf16(results, layout, strategy):
    ref, got = results
    expected = torch.tensor(ref[("bf16", strategy)]["losses"])
    assert expected[0] != expected[-1]
    last = got[-1][(layout, strategy)]
    assert last["plans"] == ["master"]
    torch.testing.assert_close(torch.tensor(last["losses"]), expected, rtol=0, atol=LOSS_ABS_BF16)
    if layout.startswith("dp2_distopt"):  # the chain rule on optimizer shards: every gradient, full shape
        _assert_grads_close(last["grads"], ref[("fp32", strategy)]["grads"], GRAD_REL_BF16)
    elif layout == "tp2_sp":  # replicated vectors: complete (TP-summed) gradients, equal on both ranks
        names = [n for n, g in last["grads"].items() if "input_scales" in n]
        assert names
        _assert_grads_close(last["grads"], ref[("fp32", strategy)]["grads"], GRAD_REL_BF16, names)
        for n in names:
            torch.testing.assert_close(got[0][(layout, strategy)]["grads"][n], last["grads"][n])


def test_bf16_moe_ep2_matches_ep1(results):
    ref, got = results
    expected = torch.tensor(ref[("bf16_moe", "unified")]["losses"])
    torch.testing.assert_close(torch.tensor(got[0][("ep2", "unified")]["losses"]), expected, rtol=0,
                               atol=LOSS_ABS_BF16)


def test_planted_bugs_are_caught():
    """Mutation tests: the oracles above fail when the DP partial sums of the vectors' gradients are
    dropped, when the copy writes W without folding it, and when a cached fold is reused after the
    parameters changed through the distributed optimizer's all-gather (issue: stale folded weight)."""
    dp2 = LAYOUTS["dp2_distopt_overlap"]
    runs = [(("ok", "dp"), "dp", dict(dp2, bf16=True)),
            (("no_sum", "dp"), "dp", dict(dp2, bf16=True, plant="no_dp_partial_sum")),
            (("no_fold", "dp"), "dp", dict(dp2, bf16=True, plant="no_fold_at_copy")),
            (("fp32_step", "dp"), "dp", dict(dp2, fold="step")),
            (("stale", "dp"), "dp", dict(dp2, fold="step", plant="stale_cache"))]
    got = run_distributed(_job, world_size=2, args=(runs,), timeout=600)[0]
    ok = got[("ok", "dp")]
    vectors = [n for n in ok["grads"] if "scales" in n]
    with pytest.raises(AssertionError):
        _assert_grads_close(got[("no_sum", "dp")]["grads"], ok["grads"], GRAD_REL_BF16, vectors)
    with pytest.raises(AssertionError):
        _assert_grads_close(got[("no_fold", "dp")]["grads"], ok["grads"], GRAD_REL_BF16)
    step, stale = got[("fp32_step", "dp")], got[("stale", "dp")]
    assert step["plans"] == stale["plans"] == ["cached"]
    assert stale["losses"][0] == step["losses"][0]  # the first step is right, later ones use the old W_eff
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.tensor(stale["losses"]), torch.tensor(step["losses"]), rtol=2e-5,
                                   atol=2e-6)
