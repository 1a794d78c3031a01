"""tools/ablation_report.py on a synthetic study (every planned run written with chosen final losses; the
expected numbers are computed by hand here), its refusal of empty or unfinished input, and the
regeneration from the exported (committed) logs."""

import csv
import json
import math
import os
import shutil
import statistics

import pytest

from megatron_sv.study.spec import Run
from tests.tools.study_fixtures import ROOT, TOKENS_PER_STEP, load_tool, study_dict, write_study

report = load_tool("ablation_report")

STUDY = study_dict(
    sweep=dict(configs=["standard", "unified"], lrs=[0.001, 0.002, 0.004], seed=1, max_extensions=0),
    compare=dict(
        configs=["standard", "hg", "unified", "standard+qk"],
        seeds=[1, 2, 3],
        lr_from={"hg": "standard", "standard+qk": "standard"},
    ),
    efficiency=dict(reference="standard", budgets=[2.0, 4.0]),
    weight_decay=dict(
        base="standard+qk+post",
        policies=["megatron", "iwd"],
        seeds=[1, 2],
        lr=0.002,
        iters=20,
        extra_flags=["--weight-decay", "0.5"],
        tag="wd0.5",
    ),
)
SEED_OFFSET = {1: 0.0, 2: 0.2, 3: 0.1}
# at each configuration's best LR (0.002 for standard, 0.004 for unified): final valid loss per seed
DELTA = {
    "standard": {1: 0.0, 2: 0.0, 3: 0.0},
    "hg": {1: -0.01, 2: -0.02, 3: 0.0},
    "unified": {1: -0.1, 2: -0.05, 3: -0.15},
    "standard+qk": {1: -0.02, 2: 0.01, 3: -0.02},
}
SWEEP = {
    ("standard", 0.001): 3.2,
    ("standard", 0.002): 3.0,
    ("standard", 0.004): 3.1,
    ("unified", 0.001): 3.3,
    ("unified", 0.002): 3.0,
}  # unified at 0.004: 3.0 - 0.1 (its compare value)


def final_valid(run: Run) -> float:
    if run.config.startswith("standard+qk+post"):
        return 3.0 + SEED_OFFSET[run.seed] + (-0.03 if run.config.endswith("iwd") else 0.0)
    if run.seed == 1 and run.iters == 10 and (run.config, run.lr) in SWEEP:
        return SWEEP[(run.config, run.lr)]
    if run.config == "standard" and run.iters > 10:  # the reference at 2x and 4x: -0.2 per doubling
        return 3.0 + SEED_OFFSET[run.seed] - 0.2 * math.log2(run.iters / 10)
    return 3.0 + SEED_OFFSET[run.seed] + DELTA[run.config][run.seed]


def final_train(run: Run) -> float:
    return final_valid(run) - 0.3


@pytest.fixture
def study_dir(tmp_path):
    root = str(tmp_path / "study")
    write_study(root, STUDY, final_valid, final_train)
    return root


def test_report_numbers_match_hand_computation(study_dir, tmp_path):
    out = str(tmp_path / "report")
    (tmp_path / "overhead.json").write_text(
        json.dumps(
            {
                "header": "CPU, fp32, 1 rank",
                "results": {
                    "standard": {
                        "ms_per_step": 10.0,
                        "time_ratio": 1.0,
                        "time_ratio_ci95": [1.0, 1.0],
                        "mem_ratio": 1.0,
                        "sv_params": 1234,
                    },
                    "unified": {
                        "ms_per_step": 11.0,
                        "time_ratio": 1.1,
                        "time_ratio_ci95": [1.05, 1.15],
                        "mem_ratio": 1.01,
                        "sv_params": 2000,
                    },
                },
            }
        )
    )
    rep = report.build_report(study_dir, out, last_n=5, overhead_json=str(tmp_path / "overhead.json"), plots=False)
    plan = rep["plan"]
    assert plan.best_lr == {"standard": 0.002, "unified": 0.004}
    rows = {r["config"]: r for r in rep["summary"]}
    assert rows["hg"]["lr"] == 0.002 and rows["hg"]["lr_source"] == "best LR of standard"
    # unified - standard, paired: (-0.1, -0.05, -0.15)
    d = rows["unified"]["d_final_valid_vs_standard"]
    assert d.diffs == pytest.approx([-0.1, -0.05, -0.15])
    half = 4.302653 * statistics.stdev([-0.1, -0.05, -0.15]) / math.sqrt(3)
    assert d.mean == pytest.approx(-0.1) and d.t_ci == pytest.approx((-0.1 - half, -0.1 + half), abs=1e-6)
    assert d.agree == 3
    # the train loss is the mean of the last 5 steps, which sit at final_valid - 0.3
    assert rows["unified"]["final_train_mean"] == pytest.approx(
        statistics.fmean([3.0 + SEED_OFFSET[s] + DELTA["unified"][s] - 0.3 for s in (1, 2, 3)])
    )
    dq = rows["standard+qk"]["d_final_valid_vs_standard"]
    assert dq.agree == 2 and dq.mean == pytest.approx(-0.01)
    assert rows["unified"]["d_final_valid_vs_standard+qk"].mean == pytest.approx(-0.1 + 0.01)

    # efficiency: the reference loses 0.2 per doubling of tokens on every seed, so a paired gain of g is worth
    # 2**(g / 0.2) times the tokens; from the seed-mean curves: 2**(0.1 / 0.2)
    e = rep["efficiency"]["unified"]
    assert e.estimate == pytest.approx(2**0.5)
    assert e.per_seed == pytest.approx({1: 2**0.5, 2: 2**0.25, 3: 2**0.75})
    assert e.range == (1.0, 4.0)
    assert rep["efficiency"]["hg"].per_seed[3] == pytest.approx(1.0)

    md = rep["markdown"]
    assert "| `standard` | 3.2000 | **3.0000** | 3.1000 | 0.002 |" in md  # the sweep row, best in bold
    assert "-0.1000 t95 [-0.2242, +0.0242]" in md and "(3/3 lower)" in md
    assert "`unified` | 1.414x |" in md
    # weight-decay study: paired with megatron, and the decay exposure wd x sum of per-step LRs
    assert "+wd=iwd` | 3.0700" in md and "-0.0300 t95" in md and "(2/2 lower)" in md
    assert f"{0.5 * 0.002 * 20:.3f} (wd 0.5 x Σlr {0.002 * 20:.3f})" in md
    assert "largest |difference|" in md and "0.00e+00" in md  # hg starts as standard on each seed
    assert "| `unified` | 11.0 | 1.100x (1.050-1.150) | 1.010x | 2,000 |" in md
    assert f"Code version(s) of the runs' attempts (git commit): `unknown` ({len(plan.runs)} runs)" in md

    with open(os.path.join(out, "summary.csv")) as f:
        srows = {r["config"]: r for r in csv.DictReader(f)}
    assert float(srows["unified"]["d_final_valid_vs_standard_mean"]) == pytest.approx(-0.1)
    assert srows["unified"]["d_final_valid_vs_standard_agree"] == "3"
    with open(os.path.join(out, "runs.csv")) as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(plan.runs) and {r["status"] for r in runs} == {"complete"}
    shared = [r for r in runs if r["id"] == "standard_lr0.002_it10_s1"][0]
    assert shared["stages"] == "sweep compare efficiency" and int(shared["tokens"]) == 10 * TOKENS_PER_STEP
    with open(os.path.join(out, "efficiency.csv")) as f:
        assert float({r["config"]: r for r in csv.DictReader(f)}["unified"]["estimate"]) == pytest.approx(2**0.5)


def test_exported_logs_regenerate_the_same_report(study_dir, tmp_path):
    pytest.importorskip("matplotlib")
    logs, out1, out2 = (str(tmp_path / n) for n in ("logs", "r1", "r2"))
    assert report.main(["--runs", study_dir, "--out", out1, "--export-logs", logs, "--last-n", "5"]) == 0
    assert not report._git_ignored(logs) and report._git_ignored(os.path.join(ROOT, "runs", "x"))
    assert sorted(os.listdir(os.path.join(logs, "standard_lr0.002_it10_s1"))) == ["metrics.jsonl", "run.json"]
    assert report.main(["--runs", logs, "--out", out2, "--last-n", "5", "--no-plots"]) == 0
    for name in ("results.md", "runs.csv", "summary.csv", "efficiency.csv"):
        assert open(os.path.join(out1, name)).read() == open(os.path.join(out2, name)).read(), name
    for png in ("lr_sweep.png", "valid_loss_vs_tokens.png", "compute_efficiency.png", "wd_valid_loss.png"):
        assert os.path.getsize(os.path.join(out1, png)) > 1000, png


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_refuses_missing_empty_and_unfinished_input(study_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert report.main(["--runs", str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in _err(capsys)[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["--runs", str(empty), "--out", out]) == 2
    assert "has no study.json" in _err(capsys)[-1]
    # a study directory whose runs have not finished (here: none has any metrics)
    (empty / "study.json").write_text(open(os.path.join(study_dir, "study.json")).read())
    os.makedirs(empty / "standard_lr0.001_it10_s1")
    (empty / "standard_lr0.001_it10_s1" / "run.json").write_text(
        open(os.path.join(study_dir, "standard_lr0.001_it10_s1", "run.json")).read()
    )
    assert report.main(["--runs", str(empty), "--out", out, "--export-logs", str(tmp_path / "x")]) == 2
    assert "holds no finished run" in _err(capsys)[-1]
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "x")  # nothing written
    # one planned run is missing: refused unless --allow-incomplete, which says so in the report
    shutil.rmtree(os.path.join(study_dir, "hg_lr0.002_it10_s3"))
    assert report.main(["--runs", study_dir, "--out", out, "--no-plots"]) == 2
    err = _err(capsys)[-1]
    assert "1 of" in err and "planned runs are not finished (e.g. hg_lr0.002_it10_s3)" in err
    assert report.main(["--runs", study_dir, "--out", out, "--no-plots", "--allow-incomplete"]) == 0
    assert "**Incomplete:** 1 of" in open(os.path.join(out, "results.md")).read()


def test_corrupt_log_is_a_clear_error(study_dir, tmp_path, capsys):
    p = os.path.join(study_dir, "standard_lr0.002_it10_s2", "metrics.jsonl")
    lines = open(p).read().splitlines()
    lines[3] = "{not json"
    open(p, "w").write("\n".join(lines) + "\n")
    assert report.main(["--runs", study_dir, "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    assert "metrics.jsonl:4: not a JSON record" in _err(capsys)[-1]


def test_diverged_sweep_run_counts_as_infinite(tmp_path):
    root = str(tmp_path / "s")
    write_study(
        root,
        STUDY,
        final_valid,
        final_train,
        diverged=lambda r: r.config == "unified" and r.lr == 0.004 and r.seed == 1,
    )
    rep = report.build_report(root, str(tmp_path / "r"), last_n=5, plots=False)
    assert rep["plan"].best_lr["unified"] == 0.002
    assert "| `unified` | 3.3000 | **3.0000** | diverged |" in rep["markdown"]
