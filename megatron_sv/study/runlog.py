"""One run's files on disk and the small per-run record a report needs.

A study's output directory holds `study.json` (the resolved study) and one directory per run:

  <id>/run.json        written by the runner: the run's identity (config, lr, seed, iters, tag),
                       tokens per step, the launch command, and one entry per attempt (rc, wall time)
  <id>/metrics.jsonl   written by pretrain_gpt_sv.py (--metrics-file): one train record per iteration, one
                       valid record per evaluation; appended to on resume (the later record of an iteration wins)
  <id>/stdout.log, slurm-<job>.out, checkpoints/, tensorboard/   (not needed by the report)

`trim_records` keeps what the report reads (validation records, iteration 1, every k-th train record, the
last TAIL train records, and a summary of the whole log: the sum of the per-step LRs for the weight-decay
exposure) so that the committed logs of a study are small; the report trims every log it reads, raw or
already trimmed (trimming is idempotent), so both give the same report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_sv.study.spec import Run, Study

RUN_FILE, METRICS_FILE, STUDY_FILE = "run.json", "metrics.jsonl", "study.json"
TAIL = 50  # train records kept at the end (the report's --last-n may not exceed it)
CURVE_POINTS = 200  # about this many train records kept over the whole run
# printed by pretrain_gpt_sv.py when a loss or gradient norm is not finite (exit code 3)
DIVERGED_MARK = "training diverged"
EXIT_DIVERGED = 3


class RunLogError(ValueError):
    pass


def read_records(path: str) -> List[dict]:
    out = []
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves a torn last line
                break
            raise RunLogError(f"{path}:{n}: not a JSON record") from None
    return out


def trim_records(records: List[dict]) -> List[dict]:
    """Deduplicated (later wins), thinned, rounded records plus one summary record; idempotent."""
    train: Dict[int, dict] = {}
    valid: Dict[int, dict] = {}
    summary = None
    for r in records:
        kind = r.get("type")
        if kind == "train":
            train[int(r["iteration"])] = r
        elif kind == "valid":
            valid[int(r["iteration"])] = r
        elif kind == "summary":
            summary = r
    last = max(train, default=0)
    if summary is None or summary.get("last_iteration") != last:
        lrs = [float(r["lr"]) for r in train.values() if r.get("lr") is not None]
        summary = {"type": "summary", "last_iteration": last, "lr_sum": math.fsum(lrs), "lr_max": max(lrs, default=0.0)}
    every = max(1, last // CURVE_POINTS)
    keep = [train[i] for i in sorted(train) if i == 1 or i % every == 0 or i > last - TAIL]
    return [_rounded(r) for r in [summary] + keep + [valid[i] for i in sorted(valid)]]


@dataclass
class RunLog:
    """What the report reads of one run."""

    id: str
    info: dict  # run.json
    train: Dict[int, dict]  # iteration -> record (trimmed)
    valid: Dict[int, float]  # iteration -> validation loss
    summary: dict
    diverged: bool

    @property
    def iters(self) -> int:
        return int(self.info["iters"])

    @property
    def tokens_per_step(self) -> int:
        return int(self.info["tokens_per_step"])

    @property
    def last_iteration(self) -> int:
        return int(self.summary["last_iteration"])

    @property
    def complete(self) -> bool:
        return self.last_iteration >= self.iters and self.iters in self.valid

    @property
    def final_valid(self) -> Optional[float]:
        if self.diverged:
            return math.inf
        return self.valid[self.iters] if self.complete else None

    def final_train(self, last_n: int) -> Optional[float]:
        if not self.complete:
            return None
        if last_n > TAIL:
            raise RunLogError(f"--last-n {last_n} exceeds the {TAIL} final train records kept per run")
        tail = [self.train[i]["loss"] for i in range(self.iters - last_n + 1, self.iters + 1) if i in self.train]
        return math.fsum(tail) / len(tail)

    @property
    def initial_loss(self) -> Optional[float]:
        r = self.train.get(1)
        return float(r["loss"]) if r else None


def _diverged(run_dir: str, info: dict) -> bool:
    if any(a.get("rc") == EXIT_DIVERGED for a in info.get("attempts", [])):
        return True
    for name in os.listdir(run_dir):
        if name == "stdout.log" or (name.startswith("slurm-") and name.endswith(".out")):
            with open(os.path.join(run_dir, name), errors="replace") as f:
                if DIVERGED_MARK in f.read():
                    return True
    return False


def read_run(run_dir: str) -> Optional[RunLog]:
    """The run in run_dir, or None if it has no run.json (not a run directory)."""
    info_path = os.path.join(run_dir, RUN_FILE)
    if not os.path.exists(info_path):
        return None
    with open(info_path) as f:
        info = json.load(f)
    mp = os.path.join(run_dir, METRICS_FILE)
    records = trim_records(read_records(mp)) if os.path.exists(mp) else trim_records([])
    train = {int(r["iteration"]): r for r in records if r.get("type") == "train"}
    valid = {int(r["iteration"]): float(r["loss"]) for r in records if r.get("type") == "valid"}
    return RunLog(os.path.basename(os.path.normpath(run_dir)), info, train, valid, records[0], _diverged(run_dir, info))


def read_study_dir(root: str) -> Dict[str, RunLog]:
    """Every run under a study directory, by id."""
    out = {}
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.isdir(d):
            r = read_run(d)
            if r is not None:
                out[r.id] = r
    return out


def run_info(study: Study, run: Run, launch: dict) -> dict:
    return dict(
        id=run.id,
        study=study.name,
        config=run.config,
        lr=run.lr,
        seed=run.seed,
        iters=run.iters,
        tag=run.tag,
        extra_flags=list(run.extra_flags),
        tokens_per_step=study.tokens_per_step,
        launch=launch,
        attempts=[],
    )


def export_logs(root: str, dest: str) -> int:
    """Copy study.json and each run's run.json + trimmed metrics.jsonl into dest (for committing)."""
    if not os.path.exists(os.path.join(root, STUDY_FILE)):
        raise RunLogError(f"{root} has no {STUDY_FILE}: not a study directory of tools/ablation.py")
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(os.path.join(root, STUDY_FILE), os.path.join(dest, STUDY_FILE))
    n = 0
    for name in sorted(os.listdir(root)):
        src = os.path.join(root, name)
        if not os.path.exists(os.path.join(src, RUN_FILE)):
            continue
        out = os.path.join(dest, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(src, RUN_FILE)) as f:
            info = json.load(f)
        with open(os.path.join(out, RUN_FILE), "w") as f:
            json.dump(info, f, indent=1)
        mp = os.path.join(src, METRICS_FILE)
        records = trim_records(read_records(mp)) if os.path.exists(mp) else []
        with open(os.path.join(out, METRICS_FILE), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        # a divergence is a result: keep the line that says so
        if _diverged(src, info) and not any(a.get("rc") == EXIT_DIVERGED for a in info.get("attempts", [])):
            with open(os.path.join(out, "stdout.log"), "w") as f:
                f.write(DIVERGED_MARK + " (from the run's log)\n")
        n += 1
    return n


def _rounded(r: dict) -> dict:
    """7 significant digits: the committed logs stay small; differences of 1e-3 in loss stay exact."""
    return {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in r.items()}
