"""The study tooling's pieces without training: the study file and its plan (megatron_sv/study/spec.py),
the statistics (stats.py), the per-run logs (runlog.py), and the commands of tools/ablation.py for local
runs and for Slurm (dry run)."""

import json
import math
import os
import shlex
import statistics

import pytest

from megatron_sv.study import stats
from megatron_sv.study.launch import local_command, sbatch_command, slurm_env
from megatron_sv.study.runlog import read_run, trim_records
from megatron_sv.study.spec import (
    STRATEGIES,
    Run,
    StudyError,
    config_flags,
    hypothetical_outcome,
    load_study,
    plan_study,
    study_from_json,
)
from tests.tools.study_fixtures import load_tool, study_dict, write_run

ablation = load_tool("ablation")

FULL = dict(
    sweep=dict(configs=["standard", "unified"], lrs=[0.001, 0.002, 0.004], seed=1),
    compare=dict(configs=["standard", "hg", "unified"], seeds=[1, 2, 3], lr_from={"hg": "standard"}),
    efficiency=dict(reference="standard", budgets=[1.5, 2.0]),
    weight_decay=dict(
        base="standard+qk+post",
        policies=["megatron", "iwd"],
        seeds=[1, 2],
        lr_from="standard",
        iters=20,
        extra_flags=["--weight-decay", "0.3"],
        tag="wd0.3",
    ),
)


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("df,q", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (29, 2.045230)])
def test_t_quantile_matches_tables(df, q):
    assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-5)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q, abs=1e-5)


def test_paired_interval_and_sign_agreement():
    p = stats.paired({1: 2.9, 2: 3.15, 3: 3.05, 4: 7.0}, {1: 3.0, 2: 3.2, 3: 3.0})  # seed 4 has no pair
    assert p.seeds == [1, 2, 3]
    d = [-0.1, -0.05, 0.05]
    assert p.mean == pytest.approx(statistics.fmean(d))
    half = 4.302653 * statistics.stdev(d) / math.sqrt(3)
    assert p.t_ci == pytest.approx((p.mean - half, p.mean + half), abs=1e-6)
    assert p.agree == 2 and p.n == 3
    assert min(d) - 1e-12 <= p.boot_ci[0] < p.boot_ci[1] <= max(d) + 1e-12
    assert stats.paired({1: 1.0, 2: math.inf}, {1: 2.0, 2: 2.0}).seeds == [1]  # diverged: left out
    up = stats.paired({1: 1.2, 2: 1.1, 3: 0.95}, {1: 1.0, 2: 1.0, 3: 1.0})  # higher on 2 of 3 seeds
    assert up.mean > 0 and up.agree == 2


def test_tokens_to_reach_is_linear_in_log_tokens():
    assert stats.tokens_to_reach([100, 200], [3.0, 2.0], 2.5) == pytest.approx(math.sqrt(100 * 200))
    assert stats.tokens_to_reach([100, 200, 400], [3.0, 2.0, 1.0], 1.5) == pytest.approx(math.sqrt(200 * 400))
    assert stats.tokens_to_reach([100, 200], [3.0, 2.0], 1.9) == math.inf  # beyond the largest budget
    assert stats.tokens_to_reach([100, 200], [3.0, 2.0], 3.1) == 0.0  # below the smallest
    # a noisy, non-monotone reference curve is made non-increasing first (pool adjacent violators)
    assert stats.isotonic_decreasing([3.0, 2.0, 2.2, 1.0]) == [3.0, 2.1, 2.1, 1.0]


def test_efficiency_per_seed_and_from_mean_curves():
    base = 100.0
    ref = {1: {100.0: 3.0, 200.0: 2.0}, 2: {100.0: 3.2, 200.0: 2.2}, 3: {100.0: 3.1, 200.0: 2.1}}
    target = {1: 2.5, 2: 2.7, 3: 2.35}  # halfway, halfway, 3/4 of the way in log tokens
    e = stats.efficiency(ref, target, base)
    assert e.per_seed[1] == pytest.approx(2**0.5) and e.per_seed[2] == pytest.approx(2**0.5)
    assert e.per_seed[3] == pytest.approx(2**0.75)
    mean_target = statistics.fmean(target.values())  # 2.5167 on the mean curve 3.1 -> 2.1
    assert e.estimate == pytest.approx(2 ** ((3.1 - mean_target) / 1.0))
    assert e.t_ci[0] < e.estimate < e.t_ci[1]
    assert e.range == (1.0, 2.0)
    # a configuration better than the largest budget gives a bound, and no t interval
    e2 = stats.efficiency(ref, {1: 1.5, 2: 2.7, 3: 2.35}, base)
    assert e2.per_seed[1] == math.inf and e2.t_ci is None


# ---------------------------------------------------------------------------------------------- the plan
def _outcome(table):
    return lambda run: table.get((run.config, run.lr, run.seed, run.iters))


def test_sweep_best_lr_dedup_and_stages():
    study = study_from_json(study_dict(**FULL))
    # nothing known: only the sweep (and nothing waiting on a fixed LR) is planned
    plan = plan_study(study, lambda r: None)
    assert list(plan.stages) == ["sweep"] and len(plan.runs) == 6
    assert any("comparison" in w for w in plan.waiting)
    losses = {
        ("standard", 0.001, 1, 10): 3.0,
        ("standard", 0.002, 1, 10): 2.8,
        ("standard", 0.004, 1, 10): 2.9,
        ("unified", 0.001, 1, 10): 2.9,
        ("unified", 0.002, 1, 10): 2.7,
        ("unified", 0.004, 1, 10): math.inf,
    }
    plan = plan_study(study, _outcome(losses))
    assert plan.best_lr == {"standard": 0.002, "unified": 0.002}
    assert plan.lr_of["hg"] == (0.002, "best LR of standard")
    cmp_ids = plan.stages["compare"]
    assert len(cmp_ids) == 9
    # the sweep's best-LR run on the sweep seed is the comparison's run: shared, not planned twice
    assert "standard_lr0.002_it10_s1" in plan.stages["sweep"] and "standard_lr0.002_it10_s1" in cmp_ids
    assert len(set(plan.stages["sweep"]) | set(cmp_ids)) == 6 + 9 - 2
    assert len(plan.runs) == 6 + 9 - 2 + 3 * 2 + 2 * 2  # + efficiency at 1.5x and 2x + weight decay
    # efficiency: the reference's 1x runs are the comparison's; 1.5x and 2x are their own runs
    eff = plan.stages["efficiency"]
    assert {plan.runs[i].iters for i in eff} == {10, 15, 20} and len(eff) == 9
    wd = plan.stages["weight_decay"]
    assert [plan.runs[i].id for i in wd][:2] == [
        "standard+qk+post+wd=megatron_lr0.002_it20_s1_wd0.3",
        "standard+qk+post+wd=iwd_lr0.002_it20_s1_wd0.3",
    ]
    assert plan.runs[wd[0]].extra_flags == ("--weight-decay", "0.3")


def test_sweep_extends_at_the_edge_and_ties_go_to_the_smaller_lr():
    study = study_from_json(study_dict(sweep=dict(configs=["standard"], lrs=[0.001, 0.002], seed=1, max_extensions=1)))
    losses = {("standard", 0.001, 1, 10): 3.0, ("standard", 0.002, 1, 10): 2.9}
    plan = plan_study(study, _outcome(losses))
    assert "standard_lr0.004_it10_s1" in plan.runs and "standard" not in plan.best_lr  # extended upwards
    losses[("standard", 0.004, 1, 10)] = 2.5  # still the edge, but no extension left
    plan = plan_study(study, _outcome(losses))
    assert plan.best_lr == {"standard": 0.004} and plan.at_edge == {"standard": "high"}
    tie = {("standard", 0.001, 1, 10): 2.0, ("standard", 0.002, 1, 10): 2.0}
    study0 = study_from_json(study_dict(sweep=dict(configs=["standard"], lrs=[0.001, 0.002], seed=1, max_extensions=0)))
    assert plan_study(study0, _outcome(tie)).best_lr == {"standard": 0.001}
    div = {("standard", 0.001, 1, 10): math.inf, ("standard", 0.002, 1, 10): math.inf}
    with pytest.raises(StudyError, match="every LR of the sweep of standard diverged"):
        plan_study(study0, _outcome(div))


@pytest.mark.parametrize(
    "patch,message",
    [
        (dict(bogus=1), "unknown field"),
        (dict(train_flags=["--lr", "1", "--eval-iters", "2"]), "--lr is set per run"),
        (dict(train_flags=["--seq-length", "8", "--global-batch-size", "2"]), "--eval-iters must be >= 1"),
        (dict(sweep=dict(configs=["standard"], lrs=[0.001], seed=1)), "at least 2 learning rates"),
        (
            dict(
                sweep=dict(configs=["standard"], lrs=[1e-3, 2e-3], seed=1),
                compare=dict(configs=["hg"], seeds=[1, 2], lr_from={"hg": "unified"}),
            ),
            "not swept",
        ),
        (
            dict(
                sweep=dict(configs=["standard"], lrs=[1e-3, 2e-3], seed=5),
                compare=dict(configs=["standard"], seeds=[1, 2]),
            ),
            "must include the sweep seed",
        ),
        (dict(compare=dict(configs=["standard+bogus"], seeds=[1], lr=1e-3)), "unknown modifier"),
        (dict(compare=dict(configs=["nonsense"], seeds=[1], lr=1e-3)), "unknown strategy"),
        (dict(weight_decay=dict(base="standard", policies=["iwd"], seeds=[1], lr=1e-3)), "must include 'megatron'"),
        (dict(weight_decay=dict(base="standard", policies=["megatron"], seeds=[1], lr=1e-3, iters=20)), "a tag"),
        (
            dict(
                compare=dict(configs=["standard"], seeds=[1], lr=1e-3),
                efficiency=dict(reference="standard", budgets=[1.0, 2.0]),
            ),
            "other than 1",
        ),
    ],
)
def test_bad_study_files_are_refused_with_one_line(patch, message):
    d = study_dict(compare=dict(configs=["standard"], seeds=[1], lr=1e-3))
    d.update(patch)
    with pytest.raises(StudyError, match=message):
        study_from_json(d)


def test_unset_environment_variable_and_round_trip(tmp_path, monkeypatch):
    d = study_dict(**FULL)
    d["train_flags"] = d["train_flags"] + ["--data-path", "${I15_TEST_DATA}"]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(d))
    monkeypatch.delenv("I15_TEST_DATA", raising=False)
    with pytest.raises(StudyError, match="I15_TEST_DATA is not set"):
        load_study(str(p))
    monkeypatch.setenv("I15_TEST_DATA", "/data/x")
    study = load_study(str(p))
    assert "/data/x" in study.train_flags
    assert study_from_json(study.to_json(), expand_env=False) == study  # what study.json stores plans the same


def test_strategy_names_match_the_method():
    from megatron_sv.scale_vectors.config import STRATEGIES as METHOD

    assert set(STRATEGIES) == set(METHOD)
    assert config_flags("standard+qk+post+wd=iwd") == (
        "standard",
        ["--qk-layernorm", "--sv-post-sublayer-norm", "--sv-weight-decay-policy", "iwd"],
    )


def test_shipped_study_files_plan(monkeypatch):
    monkeypatch.setenv("DATA_PATH", "/d/x_text_document")
    monkeypatch.setenv("TOKENIZER_MODEL", "/d/tok.model")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = [
        os.path.join(root, "examples", "studies", f) for f in os.listdir(os.path.join(root, "examples", "studies"))
    ]
    files += [
        os.path.join(root, "examples", "paper_scales", f)
        for f in os.listdir(os.path.join(root, "examples", "paper_scales"))
        if f.endswith(".json")
    ]
    assert len(files) >= 3
    for f in files:
        study = load_study(f)
        plan = plan_study(study, hypothetical_outcome(study))
        assert plan.runs and not plan.waiting, f


def test_cpu_study_meets_the_plan_of_the_issue(monkeypatch):
    """>= 1.6M tokens per run, >= 3 LRs for standard, standard+qk, unified; 3 paired seeds for the six
    configurations; a weight-decay study with lr * wd * steps well above 0.1 at the smallest LR."""
    monkeypatch.setenv("DATA_PATH", "/d/x")
    monkeypatch.setenv("TOKENIZER_MODEL", "/d/t")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    s = load_study(os.path.join(root, "examples", "studies", "ablation_cpu_lr.json"))
    assert s.iters * s.tokens_per_step >= 1_600_000
    assert {"standard", "standard+qk", "unified"} <= set(s.sweep.configs) and len(s.sweep.lrs) >= 3
    assert {"none", "standard", "standard+qk", "hg", "dnp", "unified"} <= set(s.compare.configs)
    assert len(s.compare.seeds) >= 3 and len(s.weight_decay.seeds) >= 3
    wd = float(s.weight_decay.extra_flags[s.weight_decay.extra_flags.index("--weight-decay") + 1])
    assert min(s.sweep.lrs) * wd * s.weight_decay.iters >= 0.4


# ---------------------------------------------------------------------------------------------- run logs
def test_trim_keeps_what_the_report_needs_and_is_idempotent():
    recs = [{"type": "train", "iteration": i, "loss": 10.0 - i / 100, "lr": 1e-3} for i in range(1, 1001)]
    recs += [{"type": "train", "iteration": 1000, "loss": 0.5, "lr": 1e-3}]  # resumed: the later record wins
    recs += [{"type": "valid", "iteration": i, "loss": 5.0} for i in (500, 1000)]
    t = trim_records(recs)
    assert trim_records(t) == t
    summary, train = t[0], [r for r in t if r["type"] == "train"]
    assert summary["lr_sum"] == pytest.approx(1.0) and summary["last_iteration"] == 1000
    its = [r["iteration"] for r in train]
    assert its[0] == 1 and set(range(951, 1001)) <= set(its) and len(its) < 260
    assert train[-1]["loss"] == 0.5
    assert [r["iteration"] for r in t if r["type"] == "valid"] == [500, 1000]


def test_divergence_mark_is_what_the_training_prints():
    from megatron_sv.study.runlog import DIVERGED_MARK, EXIT_DIVERGED
    from megatron_sv.training.cli import EXIT_DIVERGED as TRAINING_EXIT_DIVERGED

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert EXIT_DIVERGED == TRAINING_EXIT_DIVERGED
    assert (
        f"pretrain_gpt_sv.py: {DIVERGED_MARK} at"
        in open(os.path.join(root, "megatron_sv", "training", "loop.py")).read()
    )


def test_run_states_from_disk(tmp_path):
    study = study_from_json(study_dict(compare=dict(configs=["standard"], seeds=[1, 2, 3], lr=1e-3)))
    out = str(tmp_path)
    runs = [Run("standard", 1e-3, s, 10) for s in (1, 2, 3)]
    write_run(out, study, runs[0], 3.0)
    write_run(out, study, runs[1], 3.0, complete=False)
    write_run(out, study, runs[2], 3.0, diverged=True)
    assert [ablation.state(out, r) for r in runs] == ["complete", "partial", "diverged"]
    assert read_run(os.path.join(out, runs[0].id)).final_valid == 3.0
    assert read_run(os.path.join(out, runs[2].id)).final_valid == math.inf
    assert ablation.state(out, Run("standard", 1e-3, 4, 10)) == "todo"


# ---------------------------------------------------------------------------------------------- commands
def _flag(cmd, name):
    return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]  # the last occurrence wins in argparse


def test_local_command_of_a_run(tmp_path):
    study = study_from_json(study_dict(**FULL))
    run = Run("standard+qk+post+wd=iwd", 0.002, 2, 20, "wd0.3", ("--weight-decay", "0.3"))
    d = str(tmp_path / run.id)
    cmd = local_command(study, run, d)
    assert cmd[1].endswith("pretrain_gpt_sv.py")
    assert _flag(cmd, "--scale-vector-strategy") == "standard"
    assert "--qk-layernorm" in cmd and "--sv-post-sublayer-norm" in cmd
    assert _flag(cmd, "--sv-weight-decay-policy") == "iwd" and _flag(cmd, "--weight-decay") == "0.3"
    assert (_flag(cmd, "--lr"), _flag(cmd, "--min-lr"), _flag(cmd, "--train-iters"), _flag(cmd, "--seed")) == (
        "0.002",
        "0.0002",
        "20",
        "2",
    )
    assert _flag(cmd, "--save") == _flag(cmd, "--load") == os.path.join(d, "checkpoints")
    assert _flag(cmd, "--metrics-file") == os.path.join(d, "metrics.jsonl")
    ranks = study_from_json(study_dict(nproc=2, **FULL))
    cmd = local_command(ranks, run, d, master_port=12345)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and _flag(cmd, "--nproc-per-node") == "2"
    assert _flag(cmd, "--master-port") == "12345" and cmd[cmd.index("--master-port") + 2].endswith("pretrain_gpt_sv.py")


SLURM = dict(
    name="paper",
    launcher="slurm",
    iters=1000,
    warmup=10,
    slurm=dict(
        script="examples/paper_scales/pretrain_paper_scale.sh",
        env=dict(
            MODEL="0.12b",
            OPT="adam",
            SCHED="cosine",
            GBS="256",
            SEQ="2048",
            DATA_PATH="/data/c",
            TOKENIZER_MODEL="/data/t.model",
        ),
        sbatch_args=["--nodes=1", "--time=04:00:00"],
        continue_sbatch_args=["--partition=cpu"],
    ),
    sweep=dict(configs=["standard"], lrs=[1e-3, 2e-3, 4e-3], seed=1, max_extensions=0),
    compare=dict(configs=["standard", "unified+qk"], seeds=[1, 2], lr_from={"unified+qk": "standard"}),
)


def _parse_dry_run(text):
    """(comment, argv) of each command line printed by `submit --dry-run`."""
    out, comment = [], None
    for line in text.splitlines():
        if line.startswith("# "):
            comment = line[2:]
        elif line.strip():
            out.append((comment, shlex.split(line)))
    return out


def test_slurm_submit_dry_run_prints_one_sbatch_per_run_and_a_continuation(tmp_path, capsys):
    sp = tmp_path / "study.json"
    sp.write_text(json.dumps(SLURM))
    out = tmp_path / "out"
    assert ablation.main(["submit", str(sp), "--out", str(out), "--dry-run"]) == 0
    cmds = _parse_dry_run(capsys.readouterr().out)
    jobs = [(c, a) for c, a in cmds if "pretrain_paper_scale.sh" in a[-1]]
    assert len(jobs) == 3  # the sweep; the comparison waits for it
    for (comment, argv), lr in zip(jobs, ["0.001", "0.002", "0.004"]):
        env = dict(a.split("=", 1) for a in argv[: argv.index("sbatch")])
        assert env["LR"] == lr and env["MIN_LR"] == lr_min(lr) and env["STRATEGY"] == "standard"
        assert env["SEED"] == "1" and env["TRAIN_ITERS"] == "1000" and env["WARMUP"] == "10"
        assert env["SAVE_DIR"] == str(out / f"standard_lr{lr}_it1000_s1")  # checkpoints + metrics of the run
        assert env["GBS"] == "256" and env["MODEL"] == "0.12b"
        sb = argv[argv.index("sbatch") :]
        assert "--nodes=1" in sb and "--parsable" in sb
        assert f"--output={env['SAVE_DIR']}/slurm-%j.out" in sb
    cont = [a for c, a in cmds if "--wrap" in a]
    assert len(cont) == 1
    dep = [x for x in cont[0] if x.startswith("--dependency=")][0]
    assert dep.count(":") == 3 and dep.startswith("--dependency=afterany:")  # after the 3 jobs
    assert "--partition=cpu" in cont[0]
    wrap = cont[0][cont[0].index("--wrap") + 1]
    assert "tools/ablation.py submit" in wrap and str(out) in wrap
    assert not out.exists()  # a dry run writes nothing

    # the sweep finished: the next submission plans the comparison at standard's best LR, skips finished runs
    study = study_from_json(SLURM)
    for lr, loss in ((1e-3, 3.0), (2e-3, 2.8), (4e-3, 2.9)):
        write_run(str(out), study, Run("standard", lr, 1, 1000), loss)
    (out / "study.json").write_text(json.dumps(dict(study=study.to_json())))
    assert ablation.main(["submit", str(sp), "--out", str(out), "--dry-run"]) == 0
    cmds = _parse_dry_run(capsys.readouterr().out)
    jobs = [a for c, a in cmds if "pretrain_paper_scale.sh" in a[-1]]
    envs = [dict(a.split("=", 1) for a in argv[: argv.index("sbatch")]) for argv in jobs]
    assert sorted((e["STRATEGY"], e["EXTRA_ARGS"], e["SEED"], e["LR"]) for e in envs) == [
        ("standard", "", "2", "0.002"),
        ("unified", "--qk-layernorm", "1", "0.002"),
        ("unified", "--qk-layernorm", "2", "0.002"),
    ]


def lr_min(lr):
    return f"{float(lr) * 0.1:.3g}"


def test_slurm_env_and_sbatch_command_directly(tmp_path):
    study = study_from_json(SLURM)
    run = Run("unified+qk", 2e-3, 2, 1000)
    env = slurm_env(study, run, str(tmp_path / run.id))
    assert env["EXTRA_ARGS"] == "--qk-layernorm" and env["STRATEGY"] == "unified"
    cmd = sbatch_command(study, run, str(tmp_path / run.id), ["11", "12"])
    assert "--dependency=afterany:11:12" in cmd and cmd[-1].endswith("examples/paper_scales/pretrain_paper_scale.sh")


def test_runner_refuses_a_run_directory_with_another_command(tmp_path, capsys):
    d = study_dict(compare=dict(configs=["standard"], seeds=[1], lr=1e-3))
    sp = tmp_path / "s.json"
    sp.write_text(json.dumps(d))
    out = tmp_path / "out"
    study = study_from_json(d)
    run = Run("standard", 1e-3, 1, 10)
    write_run(str(out), study, run, 3.0)
    # the same study: the complete run is not started again (no process: this returns at once)
    assert ablation.main(["run", str(sp), "--out", str(out)]) == 0
    assert "1 runs done" in capsys.readouterr().out
    info = json.loads((out / run.id / "run.json").read_text())
    assert len(info["attempts"]) == 1
    # a second runner on the same folder is refused while the first holds it
    import fcntl

    with open(out / ".run.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert ablation.main(["run", str(sp), "--out", str(out)]) == 2
        assert "another tools/ablation.py run works in" in capsys.readouterr().err
    # the study file changed a shared flag: refuse, before anything runs
    d["train_flags"] = [x if x != "0.1" else "0.2" for x in d["train_flags"]]
    sp.write_text(json.dumps(d))
    assert ablation.main(["run", str(sp), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / run.id} holds a different command than the study plans (argument" in err and "'0.2'" in err


def test_cpu_script_dry_run_prints_the_study_commands(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(
        os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), DATA_PATH="/d/x_text_document", TOKENIZER_MODEL="/d/t.model"
    )
    r = subprocess.run(
        ["bash", os.path.join(root, "examples", "ablation_cpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line) for line in r.stdout.splitlines() if line and not line.startswith("#")]
    assert len(cmds) == 9  # the sweep: 3 configurations x 3 LRs; the rest waits for it
    first = cmds[0]
    assert _flag(first, "--data-path") == "/d/x_text_document" and _flag(first, "--train-iters") == "800"
    assert _flag(first, "--save") == str(tmp_path / "out" / "standard_lr0.0015_it800_s1" / "checkpoints")
    assert not (tmp_path / "out").exists()


def test_extended_study_replaces_study_json_and_keeps_the_earlier_version(tmp_path):
    d = study_dict(compare=dict(configs=["standard"], seeds=[1], lr=1e-3))
    out = str(tmp_path / "out")
    ablation.write_study(study_from_json(d), out, "s.json")
    d["compare"]["seeds"] = [1, 2]
    ablation.write_study(study_from_json(d), out, "s.json")
    stored = json.load(open(os.path.join(out, "study.json")))
    assert stored["study"]["compare"]["seeds"] == [1, 2] and stored["previous"][0]["compare"]["seeds"] == [1]
