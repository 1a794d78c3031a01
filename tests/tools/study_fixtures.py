"""Synthetic study directories for the study tooling's tests: study.json, run.json and metrics.jsonl written
the way tools/ablation.py and pretrain_gpt_sv.py write them, with chosen final losses."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable, Optional

from megatron_sv.study.launch import launch_record
from megatron_sv.study.runlog import DIVERGED_MARK, run_info
from megatron_sv.study.spec import Run, Study, plan_study, study_from_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--swiglu",
    "--untie-embeddings-and-output-weights",
    "--micro-batch-size",
    "8",
    "--global-batch-size",
    "8",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "255",
    "--log-interval",
    "1",
    "--eval-interval",
    "3",
    "--eval-iters",
    "2",
    "--no-scale-vector-stats",
    "--weight-decay",
    "0.1",
]
TOKENS_PER_STEP = 8 * 32


def study_dict(**stages) -> dict:
    d = dict(name="synthetic", launcher="local", iters=10, warmup=1, save_interval=5, train_flags=list(TINY_FLAGS))
    d.update(stages)
    return d


def write_run(
    out: str,
    study: Study,
    run: Run,
    final_valid: float,
    final_train: Optional[float] = None,
    initial: float = 9.0,
    diverged: bool = False,
    complete: bool = True,
    lr_per_step: float = None,
) -> str:
    """A run whose train loss falls linearly from `initial` to `final_train` over the first half and then stays
    there; validation at iters/2 (loss 5.0) and at the end (final_valid)."""
    d = os.path.join(out, run.id)
    os.makedirs(d, exist_ok=True)
    info = run_info(study, run, launch_record(study, run, d))
    final_train = final_valid if final_train is None else final_train
    last = run.iters if complete else run.iters // 2
    half = max(1, run.iters // 2)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for it in range(1, last + 1):
            loss = initial - (initial - final_train) * min(it - 1, half) / half
            f.write(
                json.dumps(
                    {
                        "type": "train",
                        "iteration": it,
                        "loss": loss,
                        "grad_norm": 1.0,
                        "lr": run.lr if lr_per_step is None else lr_per_step,
                        "consumed_samples": it * 8,
                        "ms_per_iter": 100.0,
                    }
                )
                + "\n"
            )
            if it == half:
                f.write(json.dumps({"type": "valid", "iteration": it, "loss": 5.0}) + "\n")
        if complete and not diverged:
            f.write(json.dumps({"type": "valid", "iteration": run.iters, "loss": final_valid}) + "\n")
    if diverged:
        info["attempts"].append(dict(rc=3, wall_s=1.0))
        with open(os.path.join(d, "stdout.log"), "w") as f:
            f.write(f"pretrain_gpt_sv.py: {DIVERGED_MARK} at iteration 3\n")
    elif complete:
        info["attempts"].append(dict(rc=0, wall_s=1.0))
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump(info, f)
    return d


def write_study(
    out: str,
    d: dict,
    final_valid: Callable[[Run], float],
    final_train: Optional[Callable[[Run], float]] = None,
    diverged: Callable[[Run], bool] = lambda r: False,
) -> Study:
    """Every run the study plans, with the given outcomes (planned stage by stage, as the runner does)."""
    study = study_from_json(d)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(dict(study=study.to_json(), source="synthetic"), f)
    done = {}
    while True:
        plan = plan_study(study, lambda r: done.get(r.id))
        new = [r for r in plan.runs.values() if r.id not in done]
        if not new:
            return study
        for r in new:
            div = diverged(r)
            write_run(out, study, r, final_valid(r), final_train(r) if final_train else None, diverged=div)
            done[r.id] = float("inf") if div else final_valid(r)
