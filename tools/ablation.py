#!/usr/bin/env python3
"""Run an ablation study (LR sweeps, paired seeds at each configuration's best LR, compute efficiency,
weight-decay study) through the real CLI, locally or as one Slurm job per run.

    python tools/ablation.py plan   STUDY.json --out DIR [--sec-per-step S]   # runs, their state, the cost
    python tools/ablation.py run    STUDY.json --out DIR [--deadline-minutes M] [--dry-run]     # local
    python tools/ablation.py submit STUDY.json --out DIR [--dry-run]          # Slurm (DRY_RUN=1 also works)

The study file format and the stages are described in megatron_sv/study/spec.py; examples:
examples/studies/*.json (CPU) and examples/paper_scales/study_*.json (cluster).

Resumable run by run: DIR/<run id>/ holds run.json (identity, command, attempts), metrics.jsonl and
checkpoints/. A complete run (it reached its last iteration and its final evaluation) or a diverged run
(exit code 3) is never started again; any other run is started again and resumes from its last checkpoint
(--load). `run` executes runs one after another; when a sweep finishes, the next stages are planned from
its results, in the same call. `submit` submits every run whose settings are known and not queued, plus
one small continuation job (--dependency=afterany on them) that calls `submit` again: it submits the next
stages once the sweep is done, and resubmits runs that stopped early (at most max_attempts times).
A run directory holding a different command than planned is an error, before anything runs; a study
extended with more seeds, budgets, LRs or stages reuses every run already done.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: import this checkout's megatron_sv
    sys.path.insert(0, REPO)

from megatron_sv.study.launch import (  # noqa: E402
    code_version,
    continue_command,
    launch_record,
    local_command,
    local_env,
    sbatch_command,
    shell_line,
    slurm_env,
)
from megatron_sv.study.runlog import (  # noqa: E402
    RUN_FILE,
    STUDY_FILE,
    RunLogError,
    read_run,
    run_info,
)
from megatron_sv.study.spec import (  # noqa: E402
    Plan,
    Run,
    Study,
    StudyError,
    hypothetical_outcome,
    load_study,
    plan_study,
)


class AblationError(RuntimeError):
    pass


def run_dir(out: str, run: Run) -> str:
    return os.path.join(out, run.id)


def outcome_from_disk(out: str):
    def outcome(run: Run) -> Optional[float]:
        log = read_run(run_dir(out, run))
        return None if log is None else log.final_valid

    return outcome


def state(out: str, run: Run) -> str:
    """todo | partial | complete | diverged."""
    log = read_run(run_dir(out, run))
    if log is None:
        return "todo"
    if log.diverged:
        return "diverged"
    return "complete" if log.complete else "partial"


def _comparable(launch: dict) -> dict:
    """The parts of a launch that define the run (not the interpreter or the rendezvous port)."""
    if launch.get("kind") == "local":
        argv = launch["argv"]
        i = next(i for i, a in enumerate(argv) if a.endswith("pretrain_gpt_sv.py"))
        return dict(kind="local", argv=argv[i + 1 :])
    return launch


def check_existing(study: Study, plan: Plan, out: str) -> None:
    """Every planned run directory that exists must hold the same command."""
    for run in plan.runs.values():
        p = os.path.join(run_dir(out, run), RUN_FILE)
        if not os.path.exists(p):
            continue
        with open(p) as f:
            info = json.load(f)
        old, new = _comparable(info.get("launch", {})), _comparable(launch_record(study, run, run_dir(out, run)))
        if old != new:
            raise AblationError(
                f"{os.path.dirname(p)} holds a different command than the study plans "
                f"({_first_difference(old, new)}); use another --out or restore the study file"
            )


def _first_difference(old: dict, new: dict) -> str:
    if old.get("kind") != new.get("kind"):
        return f"launcher {old.get('kind')} vs {new.get('kind')}"
    if new["kind"] == "local":
        a, b = old["argv"], new["argv"]
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"argument {i}: {x!r} vs {y!r}"
        return f"{len(a)} vs {len(b)} arguments"
    keys = sorted(
        k
        for k in set(old.get("env", {})) | set(new.get("env", {}))
        if old.get("env", {}).get(k) != new.get("env", {}).get(k)
    )
    return "environment " + ", ".join(keys) if keys else "script"


def write_study(study: Study, out: str, study_path: str) -> None:
    """Record the study in out/study.json (the report plans from it). A changed study (more seeds, budgets,
    LRs or stages) replaces it and reuses every run already done; the replaced versions are kept in
    `previous`. Runs whose command would change are refused by check_existing before this is called."""
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, STUDY_FILE)
    new = dict(study=study.to_json(), source=os.path.relpath(os.path.abspath(study_path), REPO), previous=[])
    if os.path.exists(p):
        with open(p) as f:
            old = json.load(f)
        if old.get("study") == new["study"]:
            return
        new["previous"] = old.get("previous", []) + [old.get("study")]
    with open(p + ".tmp", "w") as f:
        json.dump(new, f, indent=1)
    os.replace(p + ".tmp", p)


def _update_info(run: Run, study: Study, out: str, **attempt) -> None:
    d = run_dir(out, run)
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, RUN_FILE)
    if os.path.exists(p):
        with open(p) as f:
            info = json.load(f)
    else:
        info = run_info(study, run, launch_record(study, run, run_dir(out, run)))
    if attempt:
        info["attempts"].append(attempt)
    with open(p + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(p + ".tmp", p)


# ---------------------------------------------------------------------------------------------- plan
def describe(study: Study, plan: Plan, out: str, sec_per_step: float, sec_per_run: float) -> str:
    lines = []
    for stage, ids in plan.stages.items():
        lines.append(f"## {stage}: {len(ids)} runs")
        for i in ids:
            r = plan.runs[i]
            lines.append(f"  [{state(out, r)}] {r.id}")
    if plan.best_lr:
        lines.append(
            "best LR (sweep): "
            + ", ".join(
                f"{c} {lr:g}" + (f" (at the {plan.at_edge[c]} edge)" if c in plan.at_edge else "")
                for c, lr in plan.best_lr.items()
            )
        )
    for w in plan.waiting:
        lines.append(f"waiting for: {w}")
    est = plan_study(study, hypothetical_outcome(study))
    steps = sum(r.iters for r in est.runs.values())
    secs = steps * sec_per_step + len(est.runs) * sec_per_run
    ext = (len(study.sweep.configs) * study.sweep.max_extensions) if study.sweep else 0
    per_stage = ", ".join(f"{s} {len(v)}" for s, v in est.stages.items())
    lines.append(
        f"whole study (if no sweep is extended): {len(est.runs)} distinct runs ({per_stage}; shared runs "
        f"counted in each stage), {steps:,} steps, {steps * study.tokens_per_step:,} tokens; at "
        f"{sec_per_step} s/step + {sec_per_run} s per run: {secs / 3600:.2f} h"
    )
    if ext:
        lines.append(
            f"each sweep extension adds one run of {study.iters} steps (at most {ext}: "
            f"+{ext * (study.iters * sec_per_step + sec_per_run) / 3600:.2f} h)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- local
def _free_port() -> int:
    import socket  # only torchrun runs need a port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupted(Exception):
    """SIGINT/SIGTERM of the runner: the current run was stopped (it saves a checkpoint on SIGTERM)."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _reap_group(pgid: int, grace_s: float = 10.0) -> None:
    """End what the run left in its process group (compile workers, data loader workers) once it exited."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_one(study: Study, run: Run, out: str) -> Tuple[int, float]:
    """Start (or resume) one run; its output goes to <run>/stdout.log. If the runner is interrupted, the run
    gets SIGTERM (pretrain_gpt_sv.py saves a checkpoint and exits) and the runner waits for it."""
    d = run_dir(out, run)
    _update_info(run, study, out)
    cmd = local_command(study, run, d, _free_port() if study.nproc > 1 else None)
    code = code_version()  # the code this attempt starts with
    t0 = time.time()
    interrupted = None
    with open(os.path.join(d, "stdout.log"), "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shell_line(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=local_env(study), cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait()
        except Interrupted as e:
            interrupted = e
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the ranks
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    _reap_group(proc.pid)
    wall = time.time() - t0
    _update_info(run, study, out, rc=rc, wall_s=round(wall, 1), end=time.strftime("%Y-%m-%dT%H:%M:%S"), code=code)
    if interrupted is not None:
        raise interrupted
    return rc, wall


def cmd_run(study: Study, study_path: str, out: str, deadline_minutes: Optional[float], dry_run: bool) -> int:
    plan = plan_study(study, outcome_from_disk(out))
    check_existing(study, plan, out)
    if dry_run:
        for stage, ids in plan.stages.items():
            for i in ids:
                r = plan.runs[i]
                print(f"# {stage}: {r.id} [{state(out, r)}]\n" + shell_line(local_command(study, r, run_dir(out, r))))
        for w in plan.waiting:
            print(f"# waiting for: {w} (planned once those runs are done)")
        return 0
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".run.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise AblationError(
            f"another tools/ablation.py run works in {out} ({lock.read().strip()}); two runners "
            "would start the same run"
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    write_study(study, out, study_path)
    saved = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_all(study, out, deadline_minutes)
    except Interrupted as e:
        print(f"{e}: stopped between runs; rerun the same command to continue", file=sys.stderr, flush=True)
        return 130
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        lock.close()  # releases the lock


def _run_all(study: Study, out: str, deadline_minutes: Optional[float]) -> int:
    t_start = time.time()
    tried, failed = set(), []
    while True:
        plan = plan_study(study, outcome_from_disk(out))
        check_existing(study, plan, out)
        todo = [r for r in plan.runs.values() if r.id not in tried and state(out, r) in ("todo", "partial")]
        if not todo:
            break
        r = todo[0]
        if deadline_minutes is not None and (time.time() - t_start) / 60 > deadline_minutes:
            print(f"deadline of {deadline_minutes} min reached; rerun the same command to continue", flush=True)
            return 0
        tried.add(r.id)
        try:
            rc, wall = run_one(study, r, out)
        except Interrupted as e:
            print(
                f"{e}: stopped {r.id} at iteration {read_run(run_dir(out, r)).last_iteration} (its last checkpoint "
                "is kept); rerun the same command to resume",
                file=sys.stderr,
                flush=True,
            )
            return 130
        st = state(out, r)
        print(f"{r.id}: {st} (rc {rc}, {wall:.0f} s; study {(time.time() - t_start) / 60:.1f} min)", flush=True)
        if st not in ("complete", "diverged"):
            failed.append(r.id)
    if plan.waiting:
        print("not planned yet: " + "; ".join(plan.waiting), flush=True)
    if failed:
        print(
            f"{len(failed)} run(s) did not complete: {', '.join(failed)} (see their stdout.log; rerun the same "
            "command to resume them)",
            file=sys.stderr,
        )
        return 1
    print(f"study {study.name}: {len(plan.runs)} runs done ({(time.time() - t_start) / 60:.1f} min in this call)")
    return 0


# ---------------------------------------------------------------------------------------------- slurm
def _active_job(job_id: str) -> bool:
    """Queued or running (squeue lists it); False where Slurm's clients are absent."""
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and job_id in r.stdout.split()


def _sbatch(cmd: List[str], env: Dict[str, str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        raise AblationError(f"sbatch failed (rc {r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


CONTINUE_FILE = "continue.json"


def cmd_submit(study: Study, study_path: str, out: str, dry_run: bool) -> int:
    if study.launcher != "slurm":
        raise AblationError(f"study {study.name} has launcher {study.launcher!r}; submit needs 'slurm' (use run)")
    plan = plan_study(study, outcome_from_disk(out))
    check_existing(study, plan, out)
    if dry_run:
        return _submit(study, study_path, out, plan, dry_run)
    write_study(study, out, study_path)
    # one submitter at a time (a continuation job and a hand-run submit may meet): each sees the other's job ids
    with open(os.path.join(out, ".submit.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _submit(study, study_path, out, plan_study(study, outcome_from_disk(out)), dry_run)


def _submit(study: Study, study_path: str, out: str, plan: Plan, dry_run: bool) -> int:
    jobs, gave_up = [], []
    for r in plan.runs.values():
        st = state(out, r)
        if st in ("complete", "diverged"):
            continue
        p = os.path.join(run_dir(out, r), RUN_FILE)
        attempts = json.load(open(p)).get("attempts", []) if os.path.exists(p) else []
        if attempts and _active_job(attempts[-1].get("job_id", "")):
            jobs.append(attempts[-1]["job_id"])
            continue
        if len(attempts) >= study.slurm.max_attempts:
            gave_up.append(r.id)
            continue
        cmd = sbatch_command(study, r, run_dir(out, r))
        env = slurm_env(study, r, run_dir(out, r))
        if dry_run:
            print(f"# {r.id} [{st}]\n{shell_line(cmd, env)}")
            jobs.append(f"<{r.id}>")
            continue
        job = _sbatch(cmd, dict(os.environ, **env))
        _update_info(r, study, out, job_id=job, submitted=time.strftime("%Y-%m-%dT%H:%M:%S"), code=code_version())
        print(f"{r.id}: job {job}", flush=True)
        jobs.append(job)
    for w in plan.waiting:
        print(f"# waiting for: {w}")
    if gave_up:
        print(
            f"not resubmitted after {study.slurm.max_attempts} attempts: {', '.join(gave_up)} (see their slurm-*.out)",
            file=sys.stderr,
        )
    if jobs:
        cont = continue_command(study, study_path, out, jobs)
        if dry_run:
            print(
                f"# continuation: submits the next stages and resumes stopped runs after these jobs\n{shell_line(cont)}"
            )
            return 0
        cp = os.path.join(out, CONTINUE_FILE)
        pending = json.load(open(cp)).get("job_id") if os.path.exists(cp) else None
        if pending and pending != os.environ.get("SLURM_JOB_ID") and _active_job(pending):
            print(f"continuation job {pending} is already pending; it resubmits itself while jobs remain")
        else:
            job = _sbatch(cont, dict(os.environ))
            with open(cp, "w") as f:
                json.dump(dict(job_id=job, after=jobs), f)
            print(f"continuation job {job} (after {len(jobs)} jobs)")
    elif not plan.waiting and not gave_up:
        print(f"study {study.name}: every run is done")
    return 1 if gave_up and not jobs else 0


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "run", "submit"])
    p.add_argument("study", help="study file (JSON)")
    p.add_argument("--out", required=True, help="the study's directory: one sub-directory per run")
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("DRY_RUN") == "1",
        help="print the commands, start nothing (also DRY_RUN=1)",
    )
    p.add_argument(
        "--deadline-minutes",
        type=float,
        default=None,
        help="run: start no new run after this many minutes (rerun to continue)",
    )
    p.add_argument("--sec-per-step", type=float, default=0.28, help="plan: cost model of one training step")
    p.add_argument(
        "--sec-per-run", type=float, default=25.0, help="plan: start-up, evaluations and checkpoint saves of one run"
    )
    a = p.parse_args(argv)
    try:
        study = load_study(a.study)
        if a.command == "plan":
            plan = plan_study(study, outcome_from_disk(a.out))
            check_existing(study, plan, a.out)
            print(describe(study, plan, a.out, a.sec_per_step, a.sec_per_run))
            return 0
        if a.command == "run":
            if study.launcher != "local":
                raise AblationError(f"study {study.name} has launcher {study.launcher!r}; use submit")
            return cmd_run(study, a.study, a.out, a.deadline_minutes, a.dry_run)
        return cmd_submit(study, a.study, a.out, a.dry_run)
    except (StudyError, AblationError, RunLogError) as e:
        print(f"ablation.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
