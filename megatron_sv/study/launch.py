"""How one run of a study is launched: a local process (python or torchrun) or one Slurm job.

Local: pretrain_gpt_sv.py with the study's shared flags, the configuration's flags and the run's LR,
schedule, seed and output paths; --save/--load on the run's own checkpoints/ so an interrupted run resumes.
Slurm: one `sbatch` of the study's script (examples/paper_scales/pretrain_paper_scale.sh) per run, with the
run's settings in the job's environment (STRATEGY, EXTRA_ARGS, LR, MIN_LR, SEED, TRAIN_ITERS, WARMUP,
SAVE_DIR); that script saves to and loads from SAVE_DIR/checkpoints, so a resubmitted run resumes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from megatron_sv.study.spec import Run, Study, config_flags, lr_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _min_lr(study: Study, run: Run) -> str:
    return lr_text(run.lr * study.min_lr_ratio)


def local_command(study: Study, run: Run, run_dir: str, master_port: Optional[int] = None) -> List[str]:
    strategy, cfg = config_flags(run.config)
    if study.nproc > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(study.nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(master_port or 29547),
        ]
    else:
        launch = [sys.executable]
    sched = []
    if study.wsd_decay_fraction:
        sched = ["--lr-wsd-decay-iters", str(max(1, int(run.iters * study.wsd_decay_fraction)))]
    ckpt = os.path.join(run_dir, "checkpoints")
    save_interval = study.save_interval or max(1, run.iters // 4)
    return (
        launch
        + [os.path.join(REPO, "pretrain_gpt_sv.py")]
        + list(study.train_flags)
        + ["--scale-vector-strategy", strategy]
        + cfg
        + list(run.extra_flags)
        + [
            "--lr",
            lr_text(run.lr),
            "--min-lr",
            _min_lr(study, run),
            "--lr-warmup-iters",
            str(study.warmup),
            "--train-iters",
            str(run.iters),
        ]
        + sched
        + [
            "--seed",
            str(run.seed),
            "--metrics-file",
            os.path.join(run_dir, "metrics.jsonl"),
            "--tensorboard-dir",
            os.path.join(run_dir, "tensorboard"),
            "--save",
            ckpt,
            "--load",
            ckpt,
            "--save-interval",
            str(save_interval),
        ]
    )


def local_env(study: Study) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    # on a shared, oversubscribed CPU, spinning OpenMP threads stall each other (seconds per step);
    # passive waiting keeps a step at its uncontended cost plus the other load's share
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["OMP_NUM_THREADS"] = str(study.threads or (2 if study.nproc == 1 else 1))
    return env


def slurm_env(study: Study, run: Run, run_dir: str) -> Dict[str, str]:
    """The job's settings (on top of the submitting shell's environment, which sbatch passes on)."""
    strategy, cfg = config_flags(run.config)
    env = dict(study.slurm.env)
    env.update(
        STRATEGY=strategy,
        EXTRA_ARGS=" ".join(cfg + list(run.extra_flags)),
        LR=lr_text(run.lr),
        MIN_LR=_min_lr(study, run),
        SEED=str(run.seed),
        TRAIN_ITERS=str(run.iters),
        WARMUP=str(study.warmup),
        SAVE_DIR=os.path.abspath(run_dir),
    )
    if study.wsd_decay_fraction:
        env["WSD_FRAC"] = str(study.wsd_decay_fraction)
    return env


def sbatch_command(study: Study, run: Run, run_dir: str, dependency: Sequence[str] = ()) -> List[str]:
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name=sv-{study.name}-{run.id}",
        f"--output={os.path.abspath(run_dir)}/slurm-%j.out",
        *study.slurm.sbatch_args,
    ]
    if dependency:
        cmd.append("--dependency=afterany:" + ":".join(dependency))
    return cmd + [os.path.join(REPO, study.slurm.script)]


def continue_command(study: Study, study_path: str, out: str, dependency: Sequence[str]) -> List[str]:
    """A small job that runs after the submitted ones and submits what they made possible (next stages,
    resubmission of runs that stopped early)."""
    again = " ".join(
        shlex.quote(x)
        for x in [
            sys.executable,
            os.path.join(REPO, "tools", "ablation.py"),
            "submit",
            os.path.abspath(study_path),
            "--out",
            os.path.abspath(out),
        ]
    )
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name=sv-{study.name}-continue",
        f"--output={os.path.abspath(out)}/continue-%j.out",
        *study.slurm.continue_sbatch_args,
    ]
    if dependency:
        cmd.append("--dependency=afterany:" + ":".join(dependency))
    return cmd + ["--wrap", f"cd {shlex.quote(REPO)} && {again}"]


def code_version() -> str:
    """The checkout's commit (+dirty with uncommitted changes to tracked files), recorded with every attempt so
    a report can say which code produced its runs; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30
        )
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def launch_record(study: Study, run: Run, run_dir: str) -> dict:
    """What run.json records of the launch; a rerun compares it with the planned one."""
    if study.launcher == "local":
        return dict(kind="local", argv=local_command(study, run, run_dir))
    return dict(kind="slurm", env=slurm_env(study, run, run_dir), script=study.slurm.script)


def shell_line(cmd: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(x) for x in cmd)
