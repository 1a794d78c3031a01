#!/usr/bin/env python3
"""Report of an ablation sweep (tools/ablation.py): tables, CSV and plots from the runs' logs.

Reads RUNS/<config>/seed<k>/metrics.jsonl (falls back to the TensorBoard event files in tensorboard/
for the losses) and the TensorBoard scale-vector statistics, and writes into OUT:

  results.md            final train loss (mean of the last N iterations) and final validation loss per
                        configuration: mean, std, min/max over seeds; paired differences (same seed) to the
                        references (default `standard`, `standard+qk`; the weight-decay study to its
                        `wd=megatron` run); tokens seen; initial-loss pairing check; learned vectors;
                        overhead table (from benchmarks/bench_scale_vectors.py --json)
  summary.csv, runs.csv the same numbers, one row per configuration / per run
  loss_curves.png, loss_diff.png, wd_loss_curves.png, scale_vectors_hg.png, scale_vector_magnitudes.png

    python tools/ablation_report.py --runs runs/ablation_cpu --out docs/results/ablation_cpu \\
        --overhead-json docs/results/ablation_cpu/overhead.json --last-n 20
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import statistics
from typing import Dict, List, Optional, Tuple

# strategies that compute exactly the same function as `standard` at init (docs/scale_vectors.md)
SAME_AS_STANDARD_AT_INIT = {"none", "hg", "dp", "or", "er", "iwd"}
WD_PREFIX = "standard+qk+post+wd="


# ---------------------------------------------------------------------------------------------- reading
def read_metrics(path: str) -> Tuple[Dict[int, dict], Dict[int, float]]:
    """(train records by iteration, validation loss by iteration); later records of an iteration win."""
    train, valid = {}, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("type") == "train":
                train[int(r["iteration"])] = r
            elif r.get("type") == "valid":
                valid[int(r["iteration"])] = float(r["loss"])
    return train, valid


def read_tensorboard(tb_dir: str, prefix: Optional[str] = None) -> Dict[str, List[Tuple[int, float]]]:
    """Scalars of the event files under tb_dir: tag -> [(step, value)] (sorted, last value per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Dict[str, Dict[int, float]] = {}
    for ev in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(ev, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if prefix and not tag.startswith(prefix):
                continue
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[int(e.step)] = float(e.value)
    return {k: sorted(v.items()) for k, v in out.items()}


def _seq_length(run_dir: str, default: Optional[int]) -> Optional[int]:
    p = os.path.join(run_dir, "command.json")
    if os.path.exists(p):
        argv = json.load(open(p))["argv"]
        if "--seq-length" in argv:
            return int(argv[argv.index("--seq-length") + 1])
    return default


def _param_counts(run_dir: str) -> Tuple[Optional[int], Optional[int]]:
    p = os.path.join(run_dir, "stdout.log")
    if os.path.exists(p):
        m = re.search(r"scale-vector parameters: ([\d,]+) of ([\d,]+)", open(p, errors="replace").read())
        if m:
            return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
    return None, None


def load_run(run_dir: str, last_n: int, seq_length: Optional[int] = None) -> Optional[dict]:
    """One run's summary; None if it has no losses yet."""
    mf = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(mf):
        train, valid = read_metrics(mf)
        curve = sorted((i, float(r["loss"])) for i, r in train.items())
        last = max(train) if train else 0
        samples = train[last].get("consumed_samples") if train else None
        ms = [float(r["ms_per_iter"]) for r in train.values() if r.get("ms_per_iter") is not None]
    else:  # TensorBoard only: the train loss is logged every --log-interval
        tb = read_tensorboard(os.path.join(run_dir, "tensorboard"))
        curve = tb.get("train/loss", [])
        valid = dict(tb.get("validation/loss", []))
        last = curve[-1][0] if curve else 0
        samples, ms = None, [v for _, v in tb.get("train/ms_per_iter", [])]
    if not curve:
        return None
    tail = [v for _, v in curve[-last_n:]]
    seq = _seq_length(run_dir, seq_length)
    sv, total = _param_counts(run_dir)
    final_valid_it = max(valid) if valid else None
    return dict(
        dir=run_dir, iterations=last, train_curve=curve, valid_curve=sorted(valid.items()),
        final_train=statistics.fmean(tail), final_valid=valid[final_valid_it] if valid else None,
        final_valid_iteration=final_valid_it, initial_loss=curve[0][1] if curve[0][0] == 1 else None,
        tokens=(samples * seq) if (samples is not None and seq) else None,
        ms_per_iter=statistics.median(ms) if ms else None, sv_params=sv, total_params=total,
        finished=os.path.exists(os.path.join(run_dir, "done.json")) or not os.path.exists(
            os.path.join(run_dir, "command.json")))


def discover(runs_root: str, last_n: int, seq_length: Optional[int] = None,
             include_unfinished: bool = False) -> Dict[str, Dict[int, dict]]:
    """config -> seed -> run summary, for RUNS/<config>/seed<k>/."""
    out: Dict[str, Dict[int, dict]] = {}
    for d in sorted(glob.glob(os.path.join(runs_root, "*", "seed*"))):
        m = re.fullmatch(r"seed(\d+)", os.path.basename(d))
        if not m:
            continue
        r = load_run(d, last_n, seq_length)
        if r is None or (not r["finished"] and not include_unfinished):
            continue
        out.setdefault(os.path.basename(os.path.dirname(d)), {})[int(m.group(1))] = r
    return out


# ---------------------------------------------------------------------------------------------- statistics
def spread(values: List[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return dict(n=0, mean=None, std=None, min=None, max=None)
    return dict(n=len(v), mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else None,
                min=min(v), max=max(v))


def paired(runs: Dict[int, dict], ref: Dict[int, dict], key: str) -> dict:
    """Differences run - reference over the seeds both have."""
    seeds = sorted(s for s in runs if s in ref and runs[s][key] is not None and ref[s][key] is not None)
    d = [runs[s][key] - ref[s][key] for s in seeds]
    out = spread(d)
    out["seeds"] = seeds
    out["wins"] = sum(x < 0 for x in d)
    return out


def summarize(data: Dict[str, Dict[int, dict]], references: List[str], wd_reference: str) -> List[dict]:
    rows = []
    for config, runs in data.items():
        row = dict(config=config, seeds=sorted(runs))
        for key in ("final_train", "final_valid"):
            row[key] = spread([r[key] for r in runs.values()])
        refs = [wd_reference] if config.startswith(WD_PREFIX) else references
        row["diffs"] = {}
        for ref in refs:
            if ref in data and ref != config:
                row["diffs"][ref] = {k: paired(runs, data[ref], k) for k in ("final_train", "final_valid")}
        toks = sorted({r["tokens"] for r in runs.values() if r["tokens"] is not None})
        row["tokens"] = toks[0] if len(toks) == 1 else (toks or None)
        row["iterations"] = sorted({r["iterations"] for r in runs.values()})
        ms = [r["ms_per_iter"] for r in runs.values() if r["ms_per_iter"] is not None]
        row["ms_per_iter"] = statistics.median(ms) if ms else None
        row["sv_params"] = next((r["sv_params"] for r in runs.values() if r["sv_params"] is not None), None)
        row["total_params"] = next((r["total_params"] for r in runs.values() if r["total_params"] is not None), None)
        rows.append(row)
    return rows


def pairing_check(data: Dict[str, Dict[int, dict]]) -> List[Tuple[str, int, float]]:
    """|initial loss - standard's initial loss| per seed for configurations equal to standard at init."""
    out = []
    for config, runs in data.items():
        if config in SAME_AS_STANDARD_AT_INIT and "standard" in data:
            for s, r in runs.items():
                ref = data["standard"].get(s)
                if ref and r["initial_loss"] is not None and ref["initial_loss"] is not None:
                    out.append((config, s, abs(r["initial_loss"] - ref["initial_loss"])))
    return out


# ---------------------------------------------------------------------------------------------- formatting
def _f(x, nd=4, signed=False):
    if x is None:
        return "–"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _ms(s: dict) -> str:
    if not s["n"]:
        return "–"
    return f"{_f(s['mean'])} ± {_f(s['std'])} [{_f(s['min'])}, {_f(s['max'])}]"


def _diff(d: Optional[dict]) -> str:
    if not d or not d["n"]:
        return "–"
    return f"{_f(d['mean'], signed=True)} ± {_f(d['std'])} ({d['wins']}/{d['n']} lower)"


def _tokens(t) -> str:
    if t is None:
        return "–"
    if isinstance(t, list):
        return "/".join(f"{x:,}" for x in t)
    return f"{t:,}"


def markdown_table(rows: List[dict], refs: List[str]) -> str:
    head = ["config", "seeds", "final train loss (mean ± std [min, max])", "final valid loss"]
    for r in refs:
        head += [f"Δ train vs {r} (paired)", f"Δ valid vs {r} (paired)"]
    head += ["tokens seen", "ms/iter (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['config']}`", ",".join(map(str, row["seeds"])), _ms(row["final_train"]),
                 _ms(row["final_valid"])]
        for r in refs:
            d = row["diffs"].get(r)
            cells += [_diff(d and d["final_train"]), _diff(d and d["final_valid"])]
        cells += [_tokens(row["tokens"]), _f(row["ms_per_iter"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str) -> None:
    refs = sorted({r for row in rows for r in row["diffs"]})
    fields = ["config", "seeds", "n"]
    for k in ("final_train", "final_valid"):
        fields += [f"{k}_{s}" for s in ("mean", "std", "min", "max")]
    for r in refs:
        for k in ("final_train", "final_valid"):
            fields += [f"d_{k}_vs_{r}_{s}" for s in ("mean", "std", "n")]
    fields += ["tokens", "iterations", "ms_per_iter", "sv_params", "total_params"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            out = dict(config=row["config"], seeds=" ".join(map(str, row["seeds"])), n=len(row["seeds"]),
                       tokens=row["tokens"], iterations=" ".join(map(str, row["iterations"])),
                       ms_per_iter=row["ms_per_iter"], sv_params=row["sv_params"],
                       total_params=row["total_params"])
            for k in ("final_train", "final_valid"):
                for s in ("mean", "std", "min", "max"):
                    out[f"{k}_{s}"] = row[k][s]
            for r, d in row["diffs"].items():
                for k in ("final_train", "final_valid"):
                    for s in ("mean", "std", "n"):
                        out[f"d_{k}_vs_{r}_{s}"] = d[k][s]
            w.writerow(out)


def write_runs_csv(data: Dict[str, Dict[int, dict]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "seed", "iterations", "tokens", "initial_loss", "final_train", "final_valid",
                    "final_valid_iteration", "ms_per_iter"])
        for c, runs in data.items():
            for s, r in sorted(runs.items()):
                w.writerow([c, s, r["iterations"], r["tokens"], r["initial_loss"], r["final_train"],
                            r["final_valid"], r["final_valid_iteration"], r["ms_per_iter"]])


# ---------------------------------------------------------------------------------------------- plots
def _smooth(ys: List[float], w: int) -> List[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _mean_curve(runs: Dict[int, dict], key: str = "train_curve"):
    curves = [dict(r[key]) for r in runs.values()]
    its = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
    return its, [statistics.fmean(c[i] for c in curves) for i in its]


def plot_losses(data, configs: List[str], path: str, title: str, smooth: int, skip_frac: float = 0.25) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for c in configs:
        if c not in data:
            continue
        its, ys = _mean_curve(data[c])
        ys = _smooth(ys, smooth)
        k = int(len(its) * skip_frac)
        ax1.plot(its[k:], ys[k:], label=f"{c} (n={len(data[c])})")
        vits, vys = _mean_curve(data[c], "valid_curve")
        ax2.plot(vits, vys, marker="o", label=c)
    ax1.set(xlabel="iteration", ylabel=f"train loss (mean over seeds, moving avg {smooth})", title=title)
    ax2.set(xlabel="iteration", ylabel="validation loss (mean over seeds)", title="validation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diffs(data, configs: List[str], ref: str, path: str, smooth: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ref not in data:
        return
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for c in configs:
        if c not in data or c == ref:
            continue
        seeds = [s for s in data[c] if s in data[ref]]
        if not seeds:
            continue
        diffs = []
        for s in seeds:
            a, b = dict(data[c][s]["train_curve"]), dict(data[ref][s]["train_curve"])
            its = sorted(set(a) & set(b))
            diffs.append(dict(zip(its, _smooth([a[i] - b[i] for i in its], smooth))))
        its = sorted(set.intersection(*[set(d) for d in diffs]))
        ax.plot(its, [statistics.fmean(d[i] for d in diffs) for i in its], label=f"{c} (n={len(seeds)})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="iteration", ylabel=f"train loss − {ref} (paired by seed, moving avg {smooth})",
           title=f"paired difference to {ref} (below 0 = better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _vector_series(run_dir: str) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """vector name -> stat (mean/min/max/magnitude) -> series, from the TensorBoard scalars."""
    tags = read_tensorboard(os.path.join(run_dir, "tensorboard"), prefix="scale_vectors/")
    out: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for tag, series in tags.items():
        name, stat = tag[len("scale_vectors/"):].rsplit("/", 1)
        out.setdefault(name, {})[stat] = series
    return out


def plot_hg(run_dir: str, config: str, path: str) -> Optional[Dict[str, float]]:
    """Per layer: the branch vectors' RMS (magnitude) with their [min, max] entries over training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vecs = _vector_series(run_dir)
    layers = sorted({int(m.group(1)) for n in vecs for m in [re.match(r"layer(\d+)/", n)] if m})
    groups = [("attention input vectors", "attn/qkv/in/", ["q", "k", "v"]),
              ("MLP input vectors", "mlp/fc1/in/", ["gate", "up"])]
    if not layers or not any(f"layer{layers[0]}/{g[1]}{b}" in vecs for g in groups for b in g[2]):
        return None
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 6.4), squeeze=False)
    final = {}
    for row, (title, stem, branches) in enumerate(groups):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for b in branches:
                v = vecs.get(f"layer{layer}/{stem}{b}")
                if not v:
                    continue
                its = [i for i, _ in v["magnitude"]]
                line, = ax.plot(its, [x for _, x in v["magnitude"]], label=f"{b} RMS")
                ax.fill_between(its, [x for _, x in v["min"]], [x for _, x in v["max"]], alpha=0.12,
                                color=line.get_color())
                final.setdefault(b, []).append(v["magnitude"][-1][1])
            ax.set_title(f"layer {layer}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("RMS (line), min..max entries (band)")
            if row == 1:
                ax.set_xlabel("iteration")
            ax.legend(fontsize=7)
    fig.suptitle(f"{config}: learned branch-specific input scale vectors ({os.path.relpath(run_dir)})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {b: statistics.fmean(v) for b, v in final.items()}


def plot_magnitudes(run_dirs: Dict[str, str], path: str) -> None:
    """OR/ER magnitudes (beta) of every vector over training, one panel per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        return
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(5 * len(run_dirs), 4.4), squeeze=False)
    colors = {}
    for ax, (config, d) in zip(axes[0], run_dirs.items()):
        for name, v in sorted(_vector_series(d).items()):
            kind = re.sub(r"^layer\d+/", "", name)
            if kind not in colors:
                colors[kind] = f"C{len(colors) % 10}"
            its = [i for i, _ in v["magnitude"]]
            ax.plot(its, [x for _, x in v["magnitude"]], color=colors[kind], lw=1,
                    label=kind if kind not in ax.get_legend_handles_labels()[1] else None)
        ax.set(title=f"{config}: magnitude of each vector", xlabel="iteration",
               ylabel="magnitude (OR/ER beta, else RMS)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- overhead
def overhead_table(path: str, rows: List[dict]) -> str:
    o = json.load(open(path))
    total = {r["config"]: r["total_params"] for r in rows}
    lines = [f"Device: {o.get('device')}; shape: " + ", ".join(
        f"{k}={o['args'][k]}" for k in ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length",
                                        "micro_batch_size", "num_microbatches", "rounds") if k in o.get("args", {})),
        "", "| strategy | scale-vector params | share of the model | ms/step | step time vs standard | "
            "peak memory vs standard |", "|---|---|---|---|---|---|"]
    for s, r in o["results"].items():
        tot = total.get(s)
        share = f"{r['sv_params'] / tot:.2e}" if tot else "–"
        lines.append(f"| `{s}` | {r['sv_params']:,} | {share} | {r['ms_per_step']:.1f} | {r['time_ratio']:.3f}x | "
                     f"{r['mem_ratio']:.3f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def build_report(runs_root: str, out_dir: str, last_n: int = 20, references=("standard", "standard+qk"),
                 overhead_json: Optional[str] = None, plots: bool = True, seq_length: Optional[int] = None,
                 smooth: int = 10) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    data = discover(runs_root, last_n, seq_length)
    wd_ref = WD_PREFIX + "megatron"
    rows = summarize(data, list(references), wd_ref)
    main_rows = [r for r in rows if not r["config"].startswith(WD_PREFIX)]
    wd_rows = [r for r in rows if r["config"].startswith(WD_PREFIX)]
    order = {c: i for i, c in enumerate(["standard", "none", "hg", "dp", "dnp", "or", "er", "iwd", "unified",
                                          "standard+qk"])}
    main_rows.sort(key=lambda r: (order.get(r["config"], 99), r["config"]))
    wd_order = {p: i for i, p in enumerate(["megatron", "all", "none", "iwd"])}
    wd_rows.sort(key=lambda r: (wd_order.get(r["config"][len(WD_PREFIX):], 99), r["config"]))
    refs_present = [r for r in references if r in data]

    md = [f"# Ablation results ({os.path.relpath(runs_root)})", "",
          f"Final train loss = mean of the last {last_n} iterations' training losses; final validation loss = "
          "the last evaluation (end of training). Mean ± sample std [min, max] over seeds. Δ = configuration − "
          "reference on the same seed (same data order and initial weights), mean ± std of the paired "
          "differences over seeds, and on how many seeds the configuration was lower.", ""]
    if main_rows:
        md += ["## Strategies", "", markdown_table(main_rows, refs_present), ""]
    if wd_rows:
        md += ["## Weight-decay study (standard + QK-norm + post-sub-layer norms)", "",
               markdown_table(wd_rows, [wd_ref] if wd_ref in data else []), ""]
    chk = pairing_check(data)
    if chk:
        worst = max(chk, key=lambda t: t[2])
        md += ["## Pairing check", "",
               f"Configurations that start as the same function as `standard` "
               f"({', '.join(sorted({c for c, _, _ in chk}))}) must have the same iteration-1 loss on the same "
               f"seed: largest |difference| over {len(chk)} runs = {worst[2]:.2e} ({worst[0]}, seed {worst[1]}).", ""]
    hg_final = None
    if plots:
        plot_losses(data, [r["config"] for r in main_rows], os.path.join(out_dir, "loss_curves.png"),
                    "train loss", smooth)
        if "standard" in data:
            plot_diffs(data, [r["config"] for r in main_rows], "standard", os.path.join(out_dir, "loss_diff.png"),
                       smooth)
        if wd_rows:
            plot_losses(data, [r["config"] for r in wd_rows], os.path.join(out_dir, "wd_loss_curves.png"),
                        "weight-decay study: train loss", smooth)
            if wd_ref in data:
                plot_diffs(data, [r["config"] for r in wd_rows], wd_ref, os.path.join(out_dir, "wd_loss_diff.png"),
                           smooth)
        first = lambda c: data[c][min(data[c])]["dir"]  # noqa: E731
        if "hg" in data:
            hg_final = plot_hg(first("hg"), "hg", os.path.join(out_dir, "scale_vectors_hg.png"))
        mags = {c: first(c) for c in ("or", "er", "unified", "standard") if c in data}
        plot_magnitudes(mags, os.path.join(out_dir, "scale_vector_magnitudes.png"))
    if hg_final:
        md += ["## Learned branch vectors (hg, first seed, end of training)", "",
               "Mean over layers of each branch vector's RMS (all start at 1.0): "
               + ", ".join(f"{b} {v:.3f}" for b, v in hg_final.items()), ""]
    if overhead_json and os.path.exists(overhead_json):
        md += ["## Overhead (benchmarks/bench_scale_vectors.py, strategies side by side)", "",
               overhead_table(overhead_json, rows), ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    write_csv(main_rows + wd_rows, os.path.join(out_dir, "summary.csv"))
    write_runs_csv(data, os.path.join(out_dir, "runs.csv"))
    return dict(data=data, rows=main_rows + wd_rows, markdown="\n".join(md))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="the --out directory of tools/ablation.py")
    p.add_argument("--out", required=True)
    p.add_argument("--last-n", type=int, default=20, help="final train loss = mean of the last N iterations")
    p.add_argument("--references", nargs="+", default=["standard", "standard+qk"])
    p.add_argument("--overhead-json", default=None, help="benchmarks/bench_scale_vectors.py --json output")
    p.add_argument("--seq-length", type=int, default=None, help="if the runs have no command.json")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the curves")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    rep = build_report(a.runs, a.out, a.last_n, a.references, a.overhead_json, not a.no_plots, a.seq_length,
                       a.smooth)
    print(rep["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
