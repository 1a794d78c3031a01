"""The overhead benchmark's statistics and verdicts (benchmarks/bench_scale_vectors.py), without timing."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_scale_vectors", os.path.join(ROOT, "benchmarks", "bench_scale_vectors.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_median_ratio_and_interval(bench):
    med, lo, hi = bench.median_ratio_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert (med, lo, hi) == (2.0, 2.0, 2.0)  # every round's ratio is 2
    med, lo, hi = bench.median_ratio_ci([1.0, 1.1, 1.2, 1.3, 5.0], [1.0] * 5)
    assert med == pytest.approx(1.2) and 1.0 <= lo <= med <= hi <= 5.0


def _raw(times, mem=None):
    return dict(times=times, memory=mem or {}, sv_params={s: 0 for s in times})


OPTS = dict(micro_batch_size=1, seq_length=10, num_microbatches=2, variants={"unified+x": ("unified", "--x")})


def test_verdicts(bench):
    raw = _raw(
        {
            "standard": [1.0, 1.0],
            "hg": [1.02, 1.02],
            "unified": [1.03, 1.03],
            "megatron-ref": [0.97, 0.97],
            "unified+x": [0.5, 0.5],
        },
        {s: {"peak": 100.0} for s in ("standard", "hg", "unified", "megatron-ref", "unified+x")},
    )
    rows = {r["strategy"]: r for r in bench.summarize(raw, "bf16", 2, OPTS)}
    assert rows["hg"]["target"].endswith("no")  # 1.02x > 1.01x
    assert rows["unified"]["target"].endswith("yes")  # 1.03x <= 1.04x
    assert rows["megatron-ref"]["target"].endswith("no")  # standard runs at 0.97x the reference's speed
    assert "tokens/s vs unified: 2.060x" in rows["unified+x"]["target"]
    assert rows["standard"]["tokens_per_s"] == pytest.approx(40.0)  # 1 x 10 x 2 tokens x 2 ranks per second
    assert "| bf16 | 2 | unified |" in bench.markdown(list(rows.values()), "header")


def test_bad_options_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--strategies", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "x=nope --flag"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--json", "x.json"])  # two precisions and two rank counts by default
