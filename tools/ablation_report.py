#!/usr/bin/env python3
"""Report of a study run by tools/ablation.py: tables with paired 95% intervals, CSV and plots.

    python tools/ablation_report.py --runs runs/ablation_cpu_lr --out docs/results/ablation_cpu_lr \\
        --export-logs docs/results/ablation_cpu_lr/logs          # copy the small per-run logs, report from them
    python tools/ablation_report.py --runs docs/results/ablation_cpu_lr/logs --out /tmp/r   # regenerate

--runs is a study directory (study.json + one directory per run with run.json and metrics.jsonl).
--export-logs copies study.json and each run's run.json and trimmed metrics.jsonl (validation records, a
thinned train curve, the last train records, the summed LR) to a folder meant to be committed, and then
reports from that folder, so the committed report is exactly what the committed logs regenerate.

Writes into --out:
  results.md            setup; LR sweep (final validation loss per LR, best marked); comparison at each
                        configuration's best LR (mean, sd, min/max over seeds) and paired differences to the
                        references (mean, 95% t interval, bootstrap interval, seeds agreeing in sign);
                        compute efficiency vs the reference; weight-decay study (with the decay exposure
                        wd x sum of LRs); pairing check (iteration-1 losses)
  runs.csv, summary.csv, efficiency.csv
  lr_sweep.png, valid_loss_vs_tokens.png, compute_efficiency.png, wd_valid_loss.png

Refuses (exit 2, one line) a missing or empty study directory, one without study.json, one whose planned
runs are not all complete (unless --allow-incomplete), and a run log that cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: import this checkout's megatron_sv
    sys.path.insert(0, REPO)

from megatron_sv.study import stats  # noqa: E402
from megatron_sv.study.runlog import (  # noqa: E402
    STUDY_FILE,
    RunLog,
    RunLogError,
    export_logs,
    read_study_dir,
)
from megatron_sv.study.spec import Plan, Run, Study, StudyError, lr_text, plan_study, study_from_json  # noqa: E402

# configurations that compute exactly the same function as `standard` at init (docs/scale_vectors.md)
SAME_AS_STANDARD_AT_INIT = {"standard", "none", "hg", "dp", "or", "er", "iwd"}


class ReportError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- loading
def load(runs_root: str) -> Tuple[Study, Dict[str, RunLog]]:
    if not os.path.isdir(runs_root):
        raise ReportError(
            f"{runs_root} does not exist (give the --out of tools/ablation.py, or a folder written by --export-logs)"
        )
    sp = os.path.join(runs_root, STUDY_FILE)
    if not os.path.exists(sp):
        raise ReportError(f"{runs_root} has no {STUDY_FILE}: not a study directory of tools/ablation.py")
    with open(sp) as f:
        study = study_from_json(json.load(f)["study"], expand_env=False)
    logs = read_study_dir(runs_root)
    if not any(log.complete or log.diverged for log in logs.values()):
        raise ReportError(f"{runs_root} holds no finished run ({len(logs)} run directories): nothing to report")
    return study, logs


def study_plan(study: Study, logs: Dict[str, RunLog]) -> Plan:
    return plan_study(study, lambda run: logs[run.id].final_valid if run.id in logs else None)


def unfinished(plan: Plan, logs: Dict[str, RunLog]) -> List[str]:
    return [i for i in plan.runs if i not in logs or not (logs[i].complete or logs[i].diverged)]


# ---------------------------------------------------------------------------------------------- formatting
def _f(x: Optional[float], nd: int = 4, signed: bool = False) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "diverged" if x > 0 else "-inf"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _spread(values: Sequence[float]) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    diverged = sum(1 for x in values if x is not None and math.isinf(x))
    note = f" ({diverged} diverged, left out)" if diverged else ""
    if not v:
        return "diverged" if diverged else "–"
    sd = f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""
    return f"{statistics.fmean(v):.4f}{sd} [{min(v):.4f}, {max(v):.4f}]{note}"


def _ci(ci: Optional[Tuple[float, float]], nd: int = 4, signed: bool = True) -> str:
    return "–" if ci is None else f"[{_f(ci[0], nd, signed)}, {_f(ci[1], nd, signed)}]"


def _paired_cell(p: stats.Paired) -> str:
    if not p.n:
        return "–"
    word = "lower" if p.mean < 0 else "higher" if p.mean > 0 else "equal"
    return f"{_f(p.mean, signed=True)} t95 {_ci(p.t_ci)} boot {_ci(p.boot_ci)} ({p.agree}/{p.n} {word})"


def _ratio(x: float, lo: float, hi: float) -> str:
    if x == 0.0:
        return f"< {lo:.2f}x"
    if math.isinf(x):
        return f"> {hi:.2f}x"
    return f"{x:.3f}x"


def _table(head: List[str], rows: List[List[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


# ---------------------------------------------------------------------------------------------- sections
def _runs_of(plan: Plan, stage: str) -> List[Run]:
    return [plan.runs[i] for i in plan.stages.get(stage, [])]


def by_config_seed(runs: List[Run], logs: Dict[str, RunLog]) -> Dict[str, Dict[int, RunLog]]:
    out: Dict[str, Dict[int, RunLog]] = {}
    for r in runs:
        if r.id in logs:
            out.setdefault(r.config, {})[r.seed] = logs[r.id]
    return out


def sweep_section(study: Study, plan: Plan, logs: Dict[str, RunLog]) -> Tuple[List[str], dict]:
    runs = _runs_of(plan, "sweep")
    if not runs:
        return [], {}
    lrs = sorted({r.lr for r in runs})
    grid: Dict[str, Dict[float, Optional[float]]] = {}
    for r in runs:
        grid.setdefault(r.config, {})[r.lr] = logs[r.id].final_valid if r.id in logs else None
    rows = []
    for c, vals in grid.items():
        best = plan.best_lr.get(c)
        cells = []
        for lr in lrs:
            v = vals.get(lr)
            txt = "" if lr not in vals else _f(v)
            cells.append(f"**{txt}**" if lr == best and txt else txt)
        note = f"{lr_text(best)}" if best is not None else "–"
        if c in plan.at_edge:
            note += f" (at the {plan.at_edge[c]} edge of the grid: the optimum may lie beyond)"
        rows.append([f"`{c}`"] + cells + [note])
    md = [
        f"## LR sweep (seed {study.sweep.seed}, {study.iters} steps)",
        "",
        "Final validation loss per peak LR (cosine to "
        f"{study.min_lr_ratio:g} x peak, {study.warmup} warm-up steps); the best LR in bold is the one every later "
        "stage uses for that configuration.",
        "",
        _table(["config"] + [f"LR {lr_text(lr)}" for lr in lrs] + ["best LR"], rows),
        "",
    ]
    return md, grid


def compare_section(study: Study, plan: Plan, logs: Dict[str, RunLog], refs: List[str], last_n: int):
    runs = _runs_of(plan, "compare")
    data = by_config_seed(runs, logs)
    if not data:
        return [], [], data
    rows, summary = [], []
    for c in study.compare.configs:
        if c not in data:
            continue
        lr, src = plan.lr_of[c]
        fv = {s: r.final_valid for s, r in data[c].items()}
        ft = {s: r.final_train(last_n) for s, r in data[c].items()}
        rows.append(
            [
                f"`{c}`",
                f"{lr_text(lr)} ({src})",
                ",".join(map(str, sorted(fv))),
                _spread(list(fv.values())),
                _spread(list(ft.values())),
            ]
        )
        row = dict(config=c, lr=lr, lr_source=src, seeds=" ".join(map(str, sorted(fv))))
        for key, vals in (("final_valid", fv), ("final_train", ft)):
            fin = [v for v in vals.values() if v is not None and math.isfinite(v)]
            row[f"{key}_mean"] = statistics.fmean(fin) if fin else None
            row[f"{key}_std"] = statistics.stdev(fin) if len(fin) > 1 else None
        for ref in refs:
            if ref not in data or ref == c:
                continue
            for key in ("final_valid", "final_train"):
                refv = {
                    s: (r.final_valid if key == "final_valid" else r.final_train(last_n)) for s, r in data[ref].items()
                }
                p = stats.paired(fv if key == "final_valid" else ft, refv)
                row[f"d_{key}_vs_{ref}"] = p
        summary.append(row)
    md = [
        f"## Comparison at each configuration's best LR ({len(study.compare.seeds)} paired seeds, "
        f"{study.iters} steps = {study.iters * study.tokens_per_step:,} tokens)",
        "",
        f"Final validation loss = the evaluation at the last step; final train loss = mean of the last {last_n} "
        "steps' training losses. Mean ± sample sd [min, max] over seeds.",
        "",
        _table(["config", "LR (source)", "seeds", "final valid loss", "final train loss"], rows),
        "",
    ]
    present = [r for r in refs if r in data]
    if present:
        md += [
            "Paired differences (configuration − reference on the same seed: same data order, same initial "
            "shared weights): mean, 95% Student-t interval, 95% bootstrap interval over seeds, and on how "
            "many seeds the difference has the sign of the mean.",
            "",
        ]
        head = ["config"] + [f"Δ valid vs `{r}`" for r in present] + [f"Δ train vs `{r}`" for r in present]
        drows = []
        for row in summary:
            cells = []
            for key in ("final_valid", "final_train"):
                for r in present:
                    p = row.get(f"d_{key}_vs_{r}")
                    cells.append(_paired_cell(p) if p else "–")
            drows.append([f"`{row['config']}`"] + cells)
        md += [_table(head, drows), ""]
    return md, summary, data


def efficiency_section(study: Study, plan: Plan, logs: Dict[str, RunLog], cmp_data) -> Tuple[List[str], list, dict]:
    eff = study.efficiency
    if eff is None or eff.reference not in plan.lr_of:
        return [], [], {}
    base_tokens = study.iters * study.tokens_per_step
    ref: Dict[int, Dict[float, float]] = {}
    for r in _runs_of(plan, "efficiency"):
        log = logs.get(r.id)
        if log is not None and log.final_valid is not None and math.isfinite(log.final_valid):
            ref.setdefault(r.seed, {})[float(r.iters * study.tokens_per_step)] = log.final_valid
    budgets = sorted({t for v in ref.values() for t in v})
    brows = [
        [
            f"{t / base_tokens:.2f}x",
            f"{int(t // study.tokens_per_step)}",
            f"{int(t):,}",
            _spread([ref[s][t] for s in ref if t in ref[s]]),
        ]
        for t in budgets
    ]
    md = [
        f"## Compute efficiency (reference `{eff.reference}` at LR {lr_text(plan.lr_of[eff.reference][0])})",
        "",
        f"`{eff.reference}` trained at each budget as its own run (the LR schedule spans the budget), seeds "
        f"{', '.join(map(str, study.compare.seeds))}:",
        "",
        _table(["budget", "steps", "tokens", "final valid loss"], brows),
        "",
        "Efficiency of a configuration = tokens the reference needs to reach the configuration's final validation "
        f"loss at 1x ({base_tokens:,} tokens), divided by those tokens; the reference's losses (made "
        "non-increasing) are interpolated linearly in log tokens. Estimate from the seed-mean curves; per seed; "
        "95% t interval over the per-seed values (when none is a bound); 95% bootstrap interval over seeds. "
        "'> x' / '< x': outside the measured budgets (a bound, not a value).",
        "",
    ]
    rows, out = [], {}
    for c in eff.configs:
        if c not in cmp_data:
            continue
        target = {s: log.final_valid for s, log in cmp_data[c].items() if log.final_valid is not None}
        e = stats.efficiency(ref, target, base_tokens)
        if e is None:
            continue
        lo, hi = e.range
        out[c] = e
        per_seed = ", ".join(f"s{s} {_ratio(v, lo, hi)}" for s, v in sorted(e.per_seed.items()))
        boot = "–" if e.boot_ci is None else f"[{_ratio(e.boot_ci[0], lo, hi)}, {_ratio(e.boot_ci[1], lo, hi)}]"
        t = "–" if e.t_ci is None else f"[{e.t_ci[0]:.3f}x, {e.t_ci[1]:.3f}x]"
        rows.append([f"`{c}`", _ratio(e.estimate, lo, hi), per_seed, t, boot])
    if rows:
        md += [
            _table(["config", "efficiency vs " + f"`{eff.reference}`", "per seed", "t95", "bootstrap 95%"], rows),
            "",
        ]
    return md, budgets, out


def _weight_decay(study: Study, run: Run) -> Optional[float]:
    flags = list(study.train_flags) + list(run.extra_flags)
    vals = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "--weight-decay"]
    return float(vals[-1]) if vals else None


def wd_section(study: Study, plan: Plan, logs: Dict[str, RunLog], last_n: int):
    runs = _runs_of(plan, "weight_decay")
    data = by_config_seed(runs, logs)
    if not data:
        return [], data
    wd = study.weight_decay
    ref = f"{wd.base}+wd=megatron"
    rows = []
    for c in wd.configs:
        if c not in data:
            continue
        fv = {s: r.final_valid for s, r in data[c].items()}
        ft = {s: r.final_train(last_n) for s, r in data[c].items()}
        exposure = []
        for r in runs:
            if r.config == c and r.id in logs:
                w = _weight_decay(study, r)
                exposure.append((logs[r.id].summary["lr_sum"], w))
        lr_sum = statistics.fmean(e[0] for e in exposure)
        w = exposure[0][1]
        expo = f"{w * lr_sum:.3f} (wd {w:g} x Σlr {lr_sum:.3f})" if w is not None else f"Σlr {lr_sum:.3f}"
        cells = [f"`{c}`", _spread(list(fv.values())), _spread(list(ft.values()))]
        if ref in data and c != ref:
            cells += [
                _paired_cell(stats.paired(fv, {s: r.final_valid for s, r in data[ref].items()})),
                _paired_cell(stats.paired(ft, {s: r.final_train(last_n) for s, r in data[ref].items()})),
            ]
        else:
            cells += ["–", "–"]
        rows.append(cells + [expo])
    lr = runs[0].lr
    md = [
        f"## Weight-decay study (`{wd.base}`, {len(wd.seeds)} paired seeds, {runs[0].iters} steps, LR {lr_text(lr)})",
        "",
        "Policies for the scale vectors' weight decay; Δ = policy − `megatron` on the same seed. Decay exposure = "
        "weight decay x the sum of the per-step LRs: a vector with no gradient would shrink by exp(−exposure).",
        "",
        _table(
            [
                "policy",
                "final valid loss",
                "final train loss",
                "Δ valid vs megatron",
                "Δ train vs megatron",
                "decay exposure",
            ],
            rows,
        ),
        "",
    ]
    return md, data


def pairing_section(plan: Plan, logs: Dict[str, RunLog]) -> List[str]:
    """Configurations equal to `standard` at init must have standard's iteration-1 loss (same seed and steps:
    the data order depends on both)."""
    std = {
        (r.seed, r.iters): logs[r.id].initial_loss
        for r in plan.runs.values()
        if r.config == "standard" and r.id in logs and logs[r.id].initial_loss is not None
    }
    diffs = []
    for r in plan.runs.values():
        if r.config in SAME_AS_STANDARD_AT_INIT and r.config != "standard" and r.id in logs:
            ref = std.get((r.seed, r.iters))
            if ref is not None and logs[r.id].initial_loss is not None:
                diffs.append((abs(logs[r.id].initial_loss - ref), r.id))
    if not diffs:
        return []
    worst = max(diffs)
    return [
        "## Pairing check",
        "",
        f"Runs of configurations that start as the same function as `standard` have its iteration-1 loss on the "
        f"same seed: largest |difference| over {len(diffs)} runs = {worst[0]:.2e} ({worst[1]}).",
        "",
    ]


def overhead_section(path: str) -> List[str]:
    """The cost of each strategy, from benchmarks/bench_scale_vectors.py --json (one precision and rank count)."""
    with open(path) as f:
        o = json.load(f)
    try:
        rows = [
            [
                f"`{s}`",
                f"{r['ms_per_step']:.1f}",
                f"{r['time_ratio']:.3f}x"
                + (
                    f" ({r['time_ratio_ci95'][0]:.3f}-{r['time_ratio_ci95'][1]:.3f})"
                    if r.get("time_ratio_ci95")
                    else ""
                ),
                f"{r['mem_ratio']:.3f}x" if r.get("mem_ratio") is not None else "–",
                f"{r['sv_params']:,}",
            ]
            for s, r in o["results"].items()
        ]
    except (KeyError, TypeError) as e:
        raise ReportError(f"{path} is not a benchmarks/bench_scale_vectors.py --json file (missing {e})") from None
    return [
        "## Overhead (benchmarks/bench_scale_vectors.py, strategies side by side)",
        "",
        o.get("header", ""),
        "",
        _table(
            [
                "strategy",
                "ms/step",
                "step time vs standard (95% CI)",
                "peak memory vs standard",
                "scale-vector parameters",
            ],
            rows,
        ),
        "",
    ]


# ---------------------------------------------------------------------------------------------- csv
def write_runs_csv(plan: Plan, logs: Dict[str, RunLog], study: Study, path: str, last_n: int) -> None:
    stage_of: Dict[str, List[str]] = {}
    for s, ids in plan.stages.items():
        for i in ids:
            stage_of.setdefault(i, []).append(s)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "id",
                "stages",
                "config",
                "lr",
                "seed",
                "iters",
                "tokens",
                "status",
                "initial_loss",
                "final_train",
                "final_valid",
                "lr_sum",
            ]
        )
        for i, r in plan.runs.items():
            log = logs.get(i)
            status = (
                "missing"
                if log is None
                else "diverged"
                if log.diverged
                else ("complete" if log.complete else "partial")
            )
            w.writerow(
                [
                    i,
                    " ".join(stage_of[i]),
                    r.config,
                    lr_text(r.lr),
                    r.seed,
                    r.iters,
                    r.iters * study.tokens_per_step,
                    status,
                    log and log.initial_loss,
                    log and log.final_train(last_n),
                    log and log.final_valid,
                    log and log.summary.get("lr_sum"),
                ]
            )


def write_summary_csv(summary: List[dict], refs: List[str], path: str) -> None:
    fields = [
        "config",
        "lr",
        "lr_source",
        "seeds",
        "final_valid_mean",
        "final_valid_std",
        "final_train_mean",
        "final_train_std",
    ]
    for r in refs:
        for k in ("final_valid", "final_train"):
            fields += [
                f"d_{k}_vs_{r}_{s}" for s in ("mean", "t95_lo", "t95_hi", "boot95_lo", "boot95_hi", "agree", "n")
            ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in summary:
            out = {k: row.get(k) for k in fields if k in row}
            for r in refs:
                for k in ("final_valid", "final_train"):
                    p = row.get(f"d_{k}_vs_{r}")
                    if p is None:
                        continue
                    pre = f"d_{k}_vs_{r}_"
                    out.update(
                        {
                            pre + "mean": p.mean,
                            pre + "agree": p.agree,
                            pre + "n": p.n,
                            pre + "t95_lo": p.t_ci and p.t_ci[0],
                            pre + "t95_hi": p.t_ci and p.t_ci[1],
                            pre + "boot95_lo": p.boot_ci and p.boot_ci[0],
                            pre + "boot95_hi": p.boot_ci and p.boot_ci[1],
                        }
                    )
            w.writerow(out)


def write_efficiency_csv(eff: Dict[str, stats.Efficiency], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["config", "estimate", "per_seed", "t95_lo", "t95_hi", "boot95_lo", "boot95_hi", "range_lo", "range_hi"]
        )
        for c, e in eff.items():
            w.writerow(
                [
                    c,
                    e.estimate,
                    " ".join(f"{s}:{v}" for s, v in sorted(e.per_seed.items())),
                    e.t_ci and e.t_ci[0],
                    e.t_ci and e.t_ci[1],
                    e.boot_ci and e.boot_ci[0],
                    e.boot_ci and e.boot_ci[1],
                    e.range[0],
                    e.range[1],
                ]
            )


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    # matplotlib is a dev extra and only needed for the figures (--no-plots works without it)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(grid: Dict[str, Dict[float, Optional[float]]], plan: Plan, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    finite = [v for g in grid.values() for v in g.values() if v is not None and math.isfinite(v)]
    top = max(finite) if finite else 1.0
    for c, g in grid.items():
        lrs = sorted(lr for lr, v in g.items() if v is not None and math.isfinite(v))
        (line,) = ax.plot(lrs, [g[lr] for lr in lrs], marker="o", label=c)
        div = [lr for lr, v in g.items() if v is not None and math.isinf(v)]
        if div:
            ax.plot(div, [top] * len(div), "x", color=line.get_color(), ms=9)
        if c in plan.best_lr and plan.best_lr[c] in g:
            ax.plot([plan.best_lr[c]], [g[plan.best_lr[c]]], "*", color=line.get_color(), ms=14)
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss", title="LR sweep (star: best; x: diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_valid_curve(runs: Dict[int, RunLog]) -> Tuple[List[float], List[float], List[float], List[float]]:
    its = sorted(set.intersection(*[set(r.valid) for r in runs.values()]))
    tps = next(iter(runs.values())).tokens_per_step
    vals = [[r.valid[i] for r in runs.values()] for i in its]
    return ([i * tps for i in its], [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals])


def plot_curves(data: Dict[str, Dict[int, RunLog]], path: str, title: str, reference: Optional[str]) -> None:
    """Left: validation loss against tokens (mean over seeds, band min..max). Right: the paired difference to
    the reference at each evaluation (where a gain opens or closes)."""
    plt = _pyplot()
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for k, (c, runs) in enumerate(data.items()):
        color = f"C{k % 10}"
        x, m, lo, hi = _mean_valid_curve(runs)
        ax.plot(x, m, marker="o", ms=3, color=color, label=f"{c} (n={len(runs)})")
        ax.fill_between(x, lo, hi, alpha=0.12, color=color)
        if reference in data and c != reference:
            seeds = [s for s in runs if s in data[reference]]
            its = (
                sorted(set.intersection(*[set(runs[s].valid) & set(data[reference][s].valid) for s in seeds]))
                if seeds
                else []
            )
            d = [[runs[s].valid[i] - data[reference][s].valid[i] for s in seeds] for i in its]
            tps = runs[seeds[0]].tokens_per_step if seeds else 0
            dx.plot(
                [i * tps for i in its],
                [statistics.fmean(v) for v in d],
                marker="o",
                ms=3,
                color=color,
                label=f"{c} (n={len(seeds)})",
            )
            dx.fill_between([i * tps for i in its], [min(v) for v in d], [max(v) for v in d], alpha=0.12, color=color)
    ax.set(xlabel="tokens", ylabel="validation loss (mean over seeds; band: min..max)", title=title)
    dx.axhline(0, color="k", lw=0.8)
    dx.set(
        xlabel="tokens",
        ylabel=f"validation loss − {reference} (same seed)",
        title=f"paired difference to {reference} (below 0 = better)",
    )
    for a in (ax, dx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_efficiency(
    study: Study, plan: Plan, logs: Dict[str, RunLog], cmp_data, eff: Dict[str, stats.Efficiency], path: str
) -> None:
    plt = _pyplot()
    base = study.iters * study.tokens_per_step
    ref: Dict[float, List[float]] = {}
    for r in _runs_of(plan, "efficiency"):
        log = logs.get(r.id)
        if log is not None and log.final_valid is not None and math.isfinite(log.final_valid):
            ref.setdefault(r.iters * study.tokens_per_step, []).append(log.final_valid)
    if len(ref) < 2:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ts = sorted(ref)
    for t in ts:
        ax.plot([t] * len(ref[t]), ref[t], ".", color="gray", alpha=0.6)
    ax.plot(
        ts,
        [statistics.fmean(ref[t]) for t in ts],
        "-o",
        color="black",
        label=f"{study.efficiency.reference} (mean; dots: seeds)",
    )
    for k, (c, e) in enumerate(eff.items()):
        finals = [
            log.final_valid
            for log in cmp_data[c].values()
            if log.final_valid is not None and math.isfinite(log.final_valid)
        ]
        if not finals:
            continue
        target = statistics.fmean(finals)
        color = f"C{k % 10}"
        ax.axhline(target, color=color, lw=0.9, ls="--")
        label = f"{c}: {_ratio(e.estimate, *e.range)}"
        if 0 < e.estimate < math.inf:
            ax.plot([e.estimate * base], [target], "D", color=color, label=label)
        else:
            ax.plot([], [], "--", color=color, label=label)
    ax.set_xscale("log")
    ax.set(
        xlabel="tokens of the reference run (log)",
        ylabel="final validation loss",
        title="tokens the reference needs to match each configuration",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def build_report(
    runs_root: str,
    out_dir: str,
    last_n: int = 20,
    references: Sequence[str] = ("standard", "standard+qk"),
    overhead_json: Optional[str] = None,
    plots: bool = True,
    allow_incomplete: bool = False,
) -> dict:
    study, logs = load(runs_root)
    plan = study_plan(study, logs)
    missing = unfinished(plan, logs)
    if missing and not allow_incomplete:
        raise ReportError(
            f"{len(missing)} of {len(plan.runs)} planned runs are not finished (e.g. {missing[0]}); "
            "finish them (tools/ablation.py run/submit) or pass --allow-incomplete"
        )
    os.makedirs(out_dir, exist_ok=True)
    refs = list(references)
    md = (
        [f"# Study `{study.name}`", ""]
        + ([study.description, ""] if study.description else [])
        + [
            f"Every run: {study.tokens_per_step:,} tokens per step; {study.iters} steps "
            f"({study.iters * study.tokens_per_step:,} tokens) unless stated; {study.warmup} warm-up steps; minimum LR "
            f"{study.min_lr_ratio:g} x peak. Shared flags: `{' '.join(study.train_flags)}`.",
            "",
        ]
    )
    versions: Dict[str, int] = {}
    for i in plan.runs:
        if i in logs:
            for v in {a.get("code", "unknown") for a in logs[i].info.get("attempts", [])} or {"unknown"}:
                versions[v] = versions.get(v, 0) + 1
    md += [
        "Code version(s) of the runs' attempts (git commit): "
        + ", ".join(f"`{v}` ({n} runs)" for v, n in sorted(versions.items()))
        + ".",
        "",
    ]
    if missing:
        md += [
            f"**Incomplete:** {len(missing)} of {len(plan.runs)} planned runs are not finished: " + ", ".join(missing),
            "",
        ]
    if plan.waiting:
        md += ["Not planned yet: " + "; ".join(plan.waiting), ""]
    sweep_md, grid = sweep_section(study, plan, logs)
    cmp_md, summary, cmp_data = compare_section(study, plan, logs, refs, last_n) if study.compare else ([], [], {})
    eff_md, _, eff = efficiency_section(study, plan, logs, cmp_data) if study.compare else ([], [], {})
    wd_md, wd_data = wd_section(study, plan, logs, last_n) if study.weight_decay else ([], {})
    md += sweep_md + cmp_md + eff_md + wd_md + pairing_section(plan, logs)
    if overhead_json:
        md += overhead_section(overhead_json)
    text = "\n".join(md)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    write_runs_csv(plan, logs, study, os.path.join(out_dir, "runs.csv"), last_n)
    write_summary_csv(summary, refs, os.path.join(out_dir, "summary.csv"))
    write_efficiency_csv(eff, os.path.join(out_dir, "efficiency.csv"))
    if plots:
        if grid:
            plot_sweep(grid, plan, os.path.join(out_dir, "lr_sweep.png"))
        if cmp_data:
            plot_curves(
                cmp_data,
                os.path.join(out_dir, "valid_loss_vs_tokens.png"),
                "validation loss, each configuration at its best LR",
                refs[0] if refs else None,
            )
            plot_efficiency(study, plan, logs, cmp_data, eff, os.path.join(out_dir, "compute_efficiency.png"))
        if wd_data:
            plot_curves(
                wd_data,
                os.path.join(out_dir, "wd_valid_loss.png"),
                "weight-decay study: validation loss",
                f"{study.weight_decay.base}+wd=megatron",
            )
    return dict(study=study, plan=plan, logs=logs, summary=summary, efficiency=eff, markdown=text)


def _git_ignored(path: str) -> bool:
    try:
        r = subprocess.run(
            ["git", "-C", REPO, "check-ignore", "-q", os.path.abspath(os.path.join(path, "study.json"))],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="a study directory (tools/ablation.py --out, or exported logs)")
    p.add_argument("--out", required=True, help="where results.md, the CSVs and the plots go")
    p.add_argument(
        "--export-logs",
        default=None,
        help="first copy the small per-run logs here (to commit them), then report from them",
    )
    p.add_argument("--last-n", type=int, default=20, help="final train loss = mean of the last N steps")
    p.add_argument("--references", nargs="+", default=["standard", "standard+qk"])
    p.add_argument(
        "--overhead-json", default=None, help="benchmarks/bench_scale_vectors.py --json output (one setting)"
    )
    p.add_argument("--allow-incomplete", action="store_true", help="report a study whose runs are not all done")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        runs = a.runs
        if a.export_logs:
            load(runs)  # refuse an empty study before writing anything
            n = export_logs(runs, a.export_logs)
            print(f"exported {n} run logs to {a.export_logs}", file=sys.stderr)
            if _git_ignored(a.export_logs):
                print(
                    f"warning: git ignores {a.export_logs}: these logs would not be committed (.gitignore excludes "
                    "every folder named runs/; use docs/results/<study>/logs)",
                    file=sys.stderr,
                )
            runs = a.export_logs
        rep = build_report(runs, a.out, a.last_n, a.references, a.overhead_json, not a.no_plots, a.allow_incomplete)
    except (ReportError, StudyError, RunLogError, OSError) as e:
        print(f"ablation_report.py: error: {e}", file=sys.stderr)
        return 2
    print(rep["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
