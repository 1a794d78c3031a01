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

from tests.helpers.distributed import run_side_by_side
from tests.helpers.parity import layout_of, tiny_gpt_shape, train_steps
from tests.helpers.vectors import randomize_vectors as _randomize_vectors

# A real bug changes a gradient by a factor (double / missing reduction: >= 0.5 relative) or uses a stale
# weight (loss off by > 1e-2 after one update at lr 1e-2); bf16 rounding (8 bits of mantissa) moves a
# gradient by about 2^-8 relative per rounded operand, accumulated over a few operands and reductions.
GRAD_REL_BF16 = 0.05  # |g_bf16 - g_fp32| / |g_fp32| per tensor
LOSS_ABS_BF16 = 2e-3  # bf16 layouts vs the TP1 bf16 run at lr 1e-3 (measured <= 8e-4; a missing fold 2e-3
#                       at the first forward already, and gradient checks catch it by far)


def _build(parallel, strategy: str, bf16: bool, moe: bool = False, fold_once_per_step: bool = False):
    from megatron_sv.models.gpt.model import build_gpt_model, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config

    shape = tiny_gpt_shape(moe)
    layout = layout_of(parallel, bf16=bf16)
    config = transformer_config(shape, layout)
    sv = strategy_config(strategy, fold_once_per_step=fold_once_per_step)
    return config, build_gpt_model(shape, sv, config, init_seed=42)


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
        "no_fold_at_copy": (
            step_fold.StepFolder,
            "fold_from_masters",
            lambda self, linears: [setattr(m.step_fold, "weight_holds_fold", True) for m in linears],
        ),
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


def _set_lr(lr):
    def hook(step, model, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = lr

    return hook if lr is not None else None


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
        lr = kw.pop("lr", None)
        undo = _plant(kw.pop("plant", None))
        plans = []
        res = train_steps(
            parallel,
            build_model=functools.partial(
                _build, strategy=strategy, bf16=bf16, moe=moe, fold_once_per_step=(mode == "step")
            ),
            collect_grads=lambda n, p: True,
            steps=3,
            model_hook=_randomize_vectors,
            keep_process_group=True,
            bf16=bf16,
            fold_policy=FoldPolicy(mode="micro_batch" if mode == "micro_batch" else "auto"),
            optimizer_overrides=functools.partial(_overrides, strategy),
            finish=lambda m: plans.append(_plans(m)),
            step_hook=_set_lr(lr),
            **kw,
        )
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
# lr 1e-3: Adam turns bf16 noise in small gradients into full-size updates; at 1e-2 two correct bf16 runs
# (per-micro-batch fold, TP1 vs TP2+SP, `unified`) drift 1e-2 apart in three steps, at 1e-3 under 1e-3
TP1 = dict(parallel={}, micro_batch_size=1, num_microbatches=2, lr=1e-3)
LAYOUTS = {
    "tp2_sp": dict(parallel={"tp": 2, "sp": True}, micro_batch_size=1, num_microbatches=2, lr=1e-3),
    "pp2": dict(parallel={"pp": 2}, micro_batch_size=1, num_microbatches=2, lr=1e-3),
    "dp2_distopt": dict(parallel={}, micro_batch_size=1, num_microbatches=1, use_distributed_optimizer=True, lr=1e-3),
    # one bucket per parameter (tiny buckets), each sharded over both ranks: every folded weight is split
    # mid-row between the ranks; reduction and parameter all-gather overlap with compute
    "dp2_distopt_overlap": dict(
        parallel={},
        micro_batch_size=1,
        num_microbatches=1,
        use_distributed_optimizer=True,
        lr=1e-3,
        ddp_overrides=dict(overlap_grad_reduce=True, overlap_param_gather=True, bucket_size=1),
    ),
}


@pytest.fixture(scope="module")
def results():
    one = []
    for s in STRATEGIES:
        one += [
            (("fp32", s), s, dict(TP1, fold="micro_batch")),
            (("bf16", s), s, dict(TP1, bf16=True)),
            (("bf16_micro", s), s, dict(TP1, bf16=True, fold="micro_batch")),
            (("fp32_step", s), s, dict(TP1, fold="step")),
        ]
    one += [(("bf16_moe", "unified"), "unified", dict(TP1, bf16=True, moe=True))]
    two = [((name, s), s, dict(kw, bf16=True)) for name, kw in LAYOUTS.items() for s in STRATEGIES]
    two += [
        (
            ("ep2", "unified"),
            "unified",
            dict(parallel={"ep": 2}, micro_batch_size=1, num_microbatches=1, bf16=True, moe=True, lr=1e-3),
        )
    ]
    two += _planted_runs()
    ref, got = run_side_by_side(
        dict(fn=_job, world_size=1, args=(one,), timeout=900), dict(fn=_job, world_size=2, args=(two,), timeout=900)
    )
    return ref[0], got


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
        torch.testing.assert_close(step["grads"][n], micro["grads"][n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


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
    got = torch.tensor(got[0][("ep2", "unified")]["losses"])
    # the first step has identical routing; after an update bf16 noise can flip a top-k choice (measured
    # 3.3e-3 after two updates), a discrete change the dense layouts do not have
    assert abs(float(got[0] - expected[0])) < LOSS_ABS_BF16
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)


def _planted_runs():
    """The runs of test_planted_bugs_are_caught (in the fixture's two-rank job; the bf16 run without a plant
    is that job's ("dp2_distopt_overlap", "dp"))."""
    dp2 = LAYOUTS["dp2_distopt_overlap"]
    return [
        (("no_sum", "dp"), "dp", dict(dp2, bf16=True, plant="no_dp_partial_sum")),
        (("no_fold", "dp"), "dp", dict(dp2, bf16=True, plant="no_fold_at_copy")),
        (("fp32_step", "dp"), "dp", dict(dp2, fold="step")),
        (("stale", "dp"), "dp", dict(dp2, fold="step", plant="stale_cache")),
    ]


def test_planted_bugs_are_caught(results):
    """Mutation tests: the oracles above fail when the DP partial sums of the vectors' gradients are
    dropped, when the copy writes W without folding it, and when a cached fold is reused after the
    parameters changed through the distributed optimizer's all-gather (issue: stale folded weight)."""
    got = results[1][0]
    ok = got[("dp2_distopt_overlap", "dp")]
    vectors = [n for n in ok["grads"] if "scales" in n]
    with pytest.raises(AssertionError):
        _assert_grads_close(got[("no_sum", "dp")]["grads"], ok["grads"], GRAD_REL_BF16, vectors)
    with pytest.raises(AssertionError):
        _assert_grads_close(got[("no_fold", "dp")]["grads"], ok["grads"], GRAD_REL_BF16)
    step, stale = got[("fp32_step", "dp")], got[("stale", "dp")]
    assert step["plans"] == stale["plans"] == ["cached"]
    assert stale["losses"][0] == step["losses"][0]  # the first step is right, later ones use the old W_eff
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.tensor(stale["losses"]), torch.tensor(step["losses"]), rtol=2e-5, atol=2e-6)


# -- in-process unit tests ------------------------------------------------------------------------------
def _qkv_pair(strategy):
    from megatron_sv.models.gpt.model import GPTShape, transformer_config
    from megatron_sv.scale_vectors.config import strategy_config
    from megatron_sv.scale_vectors.linears import ScaledColumnParallelLinear

    shape = GPTShape(
        num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2, vocab_size=32, seq_length=8
    )
    cfg = transformer_config(shape)
    sv = strategy_config(strategy)
    common = dict(config=cfg, init_method=cfg.init_method, bias=False, gather_output=False, sv=sv, branch_layout="qkv")
    torch.manual_seed(0)
    step, ref = ScaledColumnParallelLinear(16, 32, **common), ScaledColumnParallelLinear(16, 32, **common)
    gen = torch.Generator().manual_seed(3)
    for vec in list(step.input_scales.values()) + list(step.output_scales.values()):
        vec.set_value(0.5 + torch.rand(vec.local_size, generator=gen))
    ref.load_state_dict(step.state_dict())
    return step, ref


def test_row_pieces_cover_a_flat_range_slot_by_slot():
    from megatron_sv.scale_vectors.step_fold import row_pieces

    cols, block = 5, 4
    for start, end in [(0, 60), (3, 57), (7, 8), (20, 40), (19, 41), (0, 1)]:
        seen = []
        for row0, nrows, col0, ncols, off in row_pieces(start, end, cols, block):
            assert (row0 + nrows - 1) // block == row0 // block  # one slot per piece
            assert nrows == 1 or (col0 == 0 and ncols == cols)
            flat = [(row0 + r) * cols + col0 + c for r in range(nrows) for c in range(ncols)]
            assert flat[0] - start == off
            seen += flat
        assert seen == list(range(start, end))


@pytest.mark.parametrize("strategy", ["dp", "unified"])
def test_chain_rule_once_per_step_equals_autograd(megatron_single_rank, strategy):
    """fp32, cached plan: two micro-batches accumulate dL/dW_eff, the chain rule turns it into exactly
    the per-micro-batch autograd gradients of W and of every vector parameter (OR included)."""
    from megatron_sv.scale_vectors.step_fold import FoldPolicy, attach

    step, ref = _qkv_pair(strategy)
    folder = attach([step], None, FoldPolicy(mode="step"))
    assert folder.plans() == {"cached": 1}
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 2, 16, generator=gen) for _ in range(2)]
    dys = [torch.randn(3, 2, 32, generator=gen) for _ in range(2)]
    for layer in (step, ref):
        for x, dy in zip(xs, dys):
            (layer(x)[0] * dy).sum().backward()
    for p in step.parameters():  # what Megatron's DDP hook does: main_grad accumulates param.grad
        p.main_grad = p.grad.detach().clone()
    folder.apply_chain_rule()
    named = dict(ref.named_parameters())
    for name, p in step.named_parameters():
        # fp32 sum order only (an OR magnitude's gradient is a cancelling sum: absolute 1e-5)
        torch.testing.assert_close(p.main_grad, named[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_cached_fold_follows_parameter_writes_through_data(megatron_single_rank):
    """Issue 10 item 9: fold once, then the parameters change through .data (as the mixed-precision copy and
    the distributed optimizer's all-gather write them, without bumping _version): after the training hook
    after_parameters_changed the next forward uses the new weight and vectors."""
    from megatron_sv.scale_vectors import training_hooks
    from megatron_sv.scale_vectors.step_fold import FoldPolicy, attach

    step, ref = _qkv_pair("dp")
    attach([step], None, FoldPolicy(mode="step"))
    x = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(step(x)[0], ref(x)[0])
        versions = [p._version for p in step.parameters()]
        for layer in (step, ref):
            for p in layer.parameters():
                p.data.mul_(1.5)
        assert [p._version for p in step.parameters()] == versions  # invisible to a _version key
        training_hooks.after_parameters_changed([step])
        torch.testing.assert_close(step(x)[0], ref(x)[0])
