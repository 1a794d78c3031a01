"""tools/ablation.py driving real pretrain_gpt_sv.py runs (tiny model, mock data): a run interrupted through
the runner (SIGTERM) keeps its checkpoint and resumes from it on the next call; a complete run is not started
again; the report reads the result."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.tools.study_fixtures import ROOT, load_tool, study_dict

report = load_tool("ablation_report")
ablation = load_tool("ablation")


def _last_iteration(path):
    if not os.path.exists(path):
        return 0
    its = [json.loads(line)["iteration"] for line in open(path) if line.strip().startswith('{"type": "train"')]
    return max(its, default=0)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    d = study_dict(iters=30, save_interval=5, compare=dict(configs=["standard"], seeds=[1], lr=3e-3))
    d["train_flags"] = [x if x != "3" else "10" for x in d["train_flags"]]  # --eval-interval 10
    sp, out = tmp_path / "study.json", tmp_path / "out"
    sp.write_text(json.dumps(d))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablation.py"), "run", str(sp), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run_dir = out / "standard_lr0.003_it30_s1"
    metrics = run_dir / "metrics.jsonl"
    runner = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    children = []
    try:
        deadline = time.time() + 240
        while _last_iteration(metrics) < 6:  # past the first checkpoint (iteration 5)
            assert runner.poll() is None, runner.stdout.read()
            assert time.time() < deadline, "the run did not reach iteration 6"
            time.sleep(0.2)
        children = psutil.Process(runner.pid).children(recursive=True)
        runner.send_signal(signal.SIGTERM)
        text = runner.communicate(timeout=240)[0]
        assert runner.returncode == 130, text
        assert "rerun the same command to resume" in text
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # reaped
    finally:  # whatever is left of the runner and its training process
        if runner.poll() is None:
            children = [psutil.Process(runner.pid)] + psutil.Process(runner.pid).children(recursive=True)
        for p in children:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if runner.poll() is None:
            runner.wait()
    stopped_at = _last_iteration(metrics)
    assert 6 <= stopped_at < 30
    info = json.loads((run_dir / "run.json").read_text())
    assert [a["rc"] for a in info["attempts"]] == [0]  # it saved and exited cleanly on SIGTERM
    assert (run_dir / "checkpoints").is_dir()

    # second call: the partial run resumes from its checkpoint (not from scratch) and completes
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (run_dir / "stdout.log").read_text()
    assert f"training from iteration {stopped_at} to 30" in log, log[-3000:]
    assert _last_iteration(metrics) == 30
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["attempts"]) == 2 and all(a["code"] for a in info["attempts"])  # the commit of each attempt

    # third call: nothing to do, nothing started
    assert ablation.main(["run", str(sp), "--out", str(out)]) == 0
    assert len(json.loads((run_dir / "run.json").read_text())["attempts"]) == 2

    rep = report.build_report(str(out), str(tmp_path / "report"), last_n=5, plots=False)
    assert rep["logs"]["standard_lr0.003_it30_s1"].complete
