"""tools/ablation.py submit on a real Slurm cluster (tests/slurm/conftest.py): one job per run, the
continuation job (--dependency=afterany) that submits the comparison once the LR sweep is done, and the
end state (every run complete, nothing resubmitted).

The cluster has no GPU, so the study's job script is a small CPU stand-in for
examples/paper_scales/pretrain_paper_scale.sh with the same contract: it reads the run's settings from the
environment the runner gives the job (STRATEGY, EXTRA_ARGS, LR, MIN_LR, SEED, TRAIN_ITERS, WARMUP, SAVE_DIR)
and writes SAVE_DIR/metrics.jsonl and SAVE_DIR/checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.tools.study_fixtures import ROOT, load_tool

report = load_tool("ablation_report")

JOB = """#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
set -euo pipefail
export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= PYTHONWARNINGS=ignore
exec "$PYTHON" "$REPO/pretrain_gpt_sv.py" --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
  --seq-length 32 --micro-batch-size 8 --global-batch-size 8 --mock-data --tokenizer-type NullTokenizer \\
  --vocab-size 255 --log-interval 1 --eval-interval 3 --eval-iters 1 --no-scale-vector-stats \\
  --scale-vector-strategy "$STRATEGY" $EXTRA_ARGS --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" \\
  --train-iters "$TRAIN_ITERS" --seed "$SEED" --save "$SAVE_DIR/checkpoints" --load "$SAVE_DIR/checkpoints" \\
  --metrics-file "$SAVE_DIR/metrics.jsonl"
"""


# Three rounds of jobs one after another (the sweep, the comparison, the last continuation), each a few tiny
# runs; plus the session's cluster start-up when this test comes first. The whole wait is bounded below.
@pytest.mark.timeout(600)
def test_submit_runs_the_sweep_then_the_comparison(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    job = tmp_path / "job.sh"
    job.write_text(JOB)
    study = dict(
        name="slurmtest",
        launcher="slurm",
        iters=6,
        warmup=1,
        slurm=dict(
            script=str(job),
            env=dict(GBS="8", SEQ="32", PYTHON=sys.executable, REPO=ROOT),
            sbatch_args=["--time=10"],
            continue_sbatch_args=["--time=10", "--cpus-per-task=1"],
        ),
        sweep=dict(configs=["standard"], lrs=[0.001, 0.01], seed=1, max_extensions=0),
        compare=dict(configs=["standard", "hg+qk"], seeds=[1, 2], lr_from={"hg+qk": "standard"}),
    )
    sp, out = tmp_path / "study.json", tmp_path / "out"
    sp.write_text(json.dumps(study))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablation.py"), "submit", str(sp), "--out", str(out)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count(": job ") == 2 and "continuation job" in r.stdout  # the sweep, then what follows
        # submitting again while they are queued or running submits nothing twice
        r2 = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)
        assert r2.returncode == 0 and ": job " not in r2.stdout, r2.stdout + r2.stderr
        assert "is already pending" in r2.stdout, r2.stdout
        deadline = time.time() + 480
        while cluster.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split():
            assert time.time() < deadline, "the study's jobs did not finish\n" + cluster.logs()
            time.sleep(2)
    finally:
        cluster.cancel_all_jobs()
    ids = [
        "standard_lr0.001_it6_s1",
        "standard_lr0.01_it6_s1",
        "standard_lr0.01_it6_s2",
        "hg+qk_lr0.01_it6_s1",
        "hg+qk_lr0.01_it6_s2",
    ]
    for i in ids:
        info = json.loads((out / i / "run.json").read_text())
        assert len(info["attempts"]) == 1 and info["attempts"][0]["job_id"], i  # one job per run
        assert info["launch"]["env"]["SAVE_DIR"] == str(out / i)
    continuations = sorted(p for p in os.listdir(out) if p.startswith("continue-"))
    texts = [(out / p).read_text() for p in continuations]
    # exactly two continuations: after the sweep (submits the comparison), after the comparison (done)
    assert len(texts) == 2 and "every run is done" in texts[-1], texts
    rep = report.build_report(str(out), str(tmp_path / "report"), last_n=3, plots=False)
    logs = rep["logs"]
    assert all(logs[i].complete for i in ids)
    assert rep["plan"].best_lr == {"standard": 0.01}  # 6 steps: the larger LR gets further
