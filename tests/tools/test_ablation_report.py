"""tools/ablation_report.py on synthetic metrics files (values checked by hand), and the command
construction of tools/ablation.py (no training)."""

import csv
import importlib.util
import json
import os
import statistics

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load("ablation_report")
ablation = _load("ablation")

ITERS, GBS, SEQ = 10, 4, 16
# final train losses are constant over the last iterations, so mean of the last N = that constant
FINAL = {  # config -> seed -> (final train loss, final valid loss)
    "standard": {1: (3.0, 3.1), 2: (3.2, 3.3), 3: (3.1, 3.2)},
    "none": {1: (3.05, 3.2), 2: (3.3, 3.35), 3: (3.1, 3.3)},
    "unified": {1: (2.9, 3.0), 2: (3.15, 3.2), 3: (3.05, 3.15)},
    "standard+qk": {1: (2.95, 3.05), 2: (3.2, 3.25), 3: (3.0, 3.1)},
    "standard+qk+post+wd=megatron": {1: (3.0, 3.0), 2: (3.1, 3.1)},
    "standard+qk+post+wd=iwd": {1: (2.98, 2.97), 2: (3.06, 3.09)},
}


def _write_run(root, config, seed, final_train, final_valid, finished=True):
    d = os.path.join(root, config, f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for it in range(1, ITERS + 1):
            # iterations 1..5 decrease from 9.0; 6..10 sit at the final loss; iteration 1 is 9.0 for all
            loss = 9.0 - (9.0 - final_train) * (it - 1) / 5 if it <= 5 else final_train
            f.write(json.dumps({"type": "train", "iteration": it, "loss": loss, "grad_norm": 1.0, "lr": 1e-3,
                                "consumed_samples": it * GBS, "ms_per_iter": 100.0 + it}) + "\n")
            if it == 5:
                f.write(json.dumps({"type": "valid", "iteration": 5, "loss": 5.0}) + "\n")
        f.write(json.dumps({"type": "valid", "iteration": ITERS, "loss": final_valid}) + "\n")
    with open(os.path.join(d, "command.json"), "w") as f:
        json.dump({"config": config, "seed": seed, "argv": ["python", "pretrain_gpt_sv.py", "--seq-length",
                                                            str(SEQ)]}, f)
    with open(os.path.join(d, "stdout.log"), "w") as f:
        f.write("scale-vector parameters: 1,234 of 100,000 (1.234e-02 of the model) (rank 0's shard)\n")
    if finished:
        with open(os.path.join(d, "done.json"), "w") as f:
            json.dump({"rc": 0}, f)


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path / "runs")
    for c, seeds in FINAL.items():
        for s, (t, v) in seeds.items():
            _write_run(root, c, s, t, v)
    _write_run(root, "hg", 1, 3.0, 3.0, finished=False)  # unfinished: ignored
    return root


def test_table_values_match_hand_computation(runs, tmp_path):
    out = str(tmp_path / "report")
    rep = report.build_report(runs, out, last_n=5, plots=False)
    rows = {r["config"]: r for r in rep["rows"]}
    assert "hg" not in rows
    un = rows["unified"]
    # final train: mean of the last 5 iterations = the constant tail
    assert un["final_train"]["mean"] == pytest.approx((2.9 + 3.15 + 3.05) / 3)
    assert un["final_train"]["std"] == pytest.approx(statistics.stdev([2.9, 3.15, 3.05]))
    assert (un["final_train"]["min"], un["final_train"]["max"]) == (pytest.approx(2.9), pytest.approx(3.15))
    assert un["final_valid"]["mean"] == pytest.approx((3.0 + 3.2 + 3.15) / 3)
    # paired differences to standard: (-0.1, -0.05, -0.05) train, (-0.1, -0.1, -0.05) valid
    d = un["diffs"]["standard"]
    assert d["final_train"]["mean"] == pytest.approx(-0.2 / 3)
    assert d["final_train"]["std"] == pytest.approx(statistics.stdev([-0.1, -0.05, -0.05]))
    assert d["final_train"]["wins"] == 3 and d["final_train"]["seeds"] == [1, 2, 3]
    assert d["final_valid"]["mean"] == pytest.approx(-0.25 / 3)
    # and to the QK-norm control: (-0.05, -0.05, +0.05) train
    dq = un["diffs"]["standard+qk"]["final_train"]
    assert dq["mean"] == pytest.approx(-0.05 / 3) and dq["wins"] == 2
    # none vs standard: (+0.05, +0.1, 0.0)
    assert rows["none"]["diffs"]["standard"]["final_train"]["mean"] == pytest.approx(0.05)
    # weight-decay study rows are paired with wd=megatron only
    wd = rows["standard+qk+post+wd=iwd"]
    assert list(wd["diffs"]) == ["standard+qk+post+wd=megatron"]
    assert wd["diffs"]["standard+qk+post+wd=megatron"]["final_valid"]["mean"] == pytest.approx((-0.03 - 0.01) / 2)
    # tokens seen = consumed samples x seq length; parameters from the log
    assert un["tokens"] == ITERS * GBS * SEQ
    assert un["sv_params"] == 1234 and un["total_params"] == 100000
    assert un["ms_per_iter"] == pytest.approx(105.5)

    md = open(os.path.join(out, "results.md")).read()
    assert "-0.0667 ± 0.0289 (3/3 lower)" in md  # unified vs standard, train
    assert "largest |difference| over 3 runs = 0.00e+00" in md  # none vs standard at iteration 1
    with open(os.path.join(out, "summary.csv")) as f:
        csv_rows = {r["config"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["unified"]["d_final_train_vs_standard_mean"]) == pytest.approx(-0.2 / 3)
    assert csv_rows["standard"]["n"] == "3"
    with open(os.path.join(out, "runs.csv")) as f:
        assert len(list(csv.DictReader(f))) == sum(len(v) for v in FINAL.values())


def test_plots_and_overhead(runs, tmp_path):
    pytest.importorskip("matplotlib")
    oh = tmp_path / "overhead.json"
    oh.write_text(json.dumps({"device": "CPU", "args": {"hidden_size": 128}, "results": {
        "standard": {"ms_per_step": 10.0, "time_ratio": 1.0, "mem_ratio": 1.0, "sv_params": 1234},
        "unified": {"ms_per_step": 11.0, "time_ratio": 1.1, "mem_ratio": 1.01, "sv_params": 2000}}}))
    out = str(tmp_path / "report")
    rep = report.build_report(runs, out, last_n=5, overhead_json=str(oh))
    assert os.path.getsize(os.path.join(out, "loss_curves.png")) > 0
    assert os.path.getsize(os.path.join(out, "loss_diff.png")) > 0
    assert os.path.getsize(os.path.join(out, "wd_loss_curves.png")) > 0
    assert "| `unified` | 2,000 | 2.00e-02 | 11.0 | 1.100x | 1.010x |" in rep["markdown"]


def test_runner_command_construction(tmp_path):
    a = ablation.parse_args(["--out", str(tmp_path), "--configs", "standard", "dnp", "standard+qk",
                             "--wd-study", "iwd", "--seeds", "1", "2", "--iters", "7",
                             "--data-path", "data/x_text_document", "--tokenizer-model", "tok.model"])
    runs = ablation.plan(a)
    # seed-major order, every configuration once per seed
    assert [(r["config"], r["seed"]) for r in runs] == [
        ("standard", 1), ("dnp", 1), ("standard+qk", 1), ("standard+qk+post+wd=iwd", 1),
        ("standard", 2), ("dnp", 2), ("standard+qk", 2), ("standard+qk+post+wd=iwd", 2)]

    def flags(cmd, name):
        return cmd[cmd.index(name) + 1]

    shared = None
    for r in runs:
        cmd = r["cmd"]
        assert cmd[1].endswith("pretrain_gpt_sv.py")
        assert flags(cmd, "--seed") == str(r["seed"])
        assert flags(cmd, "--metrics-file") == os.path.join(r["dir"], "metrics.jsonl")
        assert flags(cmd, "--tensorboard-dir") == os.path.join(r["dir"], "tensorboard")
        assert flags(cmd, "--train-iters") == "7" and flags(cmd, "--micro-batch-size") == "8"
        # everything before the configuration's flags is identical across runs
        base = cmd[:cmd.index("--scale-vector-strategy")]
        shared = shared or base
        assert base == shared
    by = {(r["config"], r["seed"]): r["cmd"] for r in runs}
    assert flags(by[("dnp", 1)], "--scale-vector-strategy") == "dnp"
    assert "--qk-layernorm" in by[("standard+qk", 1)] and "--qk-layernorm" not in by[("standard", 1)]
    wd = by[("standard+qk+post+wd=iwd", 2)]
    assert "--sv-post-sublayer-norm" in wd and flags(wd, "--sv-weight-decay-policy") == "iwd"
    assert runs[0]["dir"] == os.path.join(str(tmp_path), "standard", "seed1")
    with pytest.raises(ValueError):
        ablation.config_flags("standard+bogus")
    with pytest.raises(ValueError):
        ablation.config_flags("nonsense")

    t = ablation.parse_args(["--out", str(tmp_path), "--launcher", "torchrun", "--nproc", "2"])
    cmd = ablation.plan(t)[0]["cmd"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and flags(cmd, "--micro-batch-size") == "4"
    assert "--mock-data" in cmd  # no --data-path given


def test_runner_skips_finished_runs(tmp_path, monkeypatch):
    a = ablation.parse_args(["--out", str(tmp_path), "--configs", "standard", "none", "--seeds", "1"])
    done = ablation.plan(a)[0]["dir"]
    os.makedirs(done)
    open(os.path.join(done, "done.json"), "w").write("{}")
    calls = []
    monkeypatch.setattr(ablation, "execute", lambda r, env: calls.append(r["config"]) or {"rc": 0, "wall_s": 0.0})
    assert ablation.main(["--out", str(tmp_path), "--configs", "standard", "none", "--seeds", "1"]) == 0
    assert calls == ["none"]
