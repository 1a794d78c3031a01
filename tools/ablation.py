#!/usr/bin/env python3
"""Ablation runner: train a list of configurations x seeds through the real CLI (pretrain_gpt_sv.py).

Every run gets the same data, token budget and hyper-parameters; only the configuration changes.
A configuration is a scale-vector strategy with optional modifiers joined by '+':

    standard            --scale-vector-strategy standard
    standard+qk         ... + --qk-layernorm                 (the QK-norm control for dnp / unified)
    standard+qk+post    ... + --qk-layernorm --sv-post-sublayer-norm
    standard+qk+post+wd=iwd   ... + --sv-weight-decay-policy iwd   (the weight-decay study)

Paired seeds: `--seed k` seeds both the initialization (torch / RNG tracker, per-layer seeds) and
Megatron-Core's GPTDataset shuffle, so seed k gives every configuration the same data order and the
same initial shared weights (scale vectors draw no random numbers).

Each run writes into OUT/<config>/seed<k>/: command.json, stdout.log, metrics.jsonl, tensorboard/ and,
when it finished, done.json. Finished runs are skipped; an unfinished run is cleared and restarted
(runs save no checkpoints; they are short). Runs execute one after another, never in parallel.

    python tools/ablation.py --out runs/ablation --configs none standard unified --seeds 1 2 3 \\
        --data-path runs/data/stdlib/stdlib_text_document --tokenizer-model runs/data/stdlib/spm8000.model
    python tools/ablation.py ... --wd-study megatron all none iwd     # adds standard+qk+post+wd=<policy>
    python tools/ablation.py ... --dry-run                            # print the commands only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ["none", "standard", "hg", "dp", "dnp", "or", "er", "iwd", "unified"]
WD_POLICIES = ["megatron", "all", "none", "iwd"]
WD_STUDY_BASE = "standard+qk+post"


def config_flags(config: str) -> List[str]:
    """CLI flags of one configuration name (see the module docstring)."""
    strategy, *mods = config.split("+")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} in {config!r} (choose from {STRATEGIES})")
    flags = ["--scale-vector-strategy", strategy]
    for m in mods:
        if m == "qk":
            flags.append("--qk-layernorm")
        elif m == "post":
            flags.append("--sv-post-sublayer-norm")
        elif m.startswith("wd="):
            policy = m[3:]
            if policy not in WD_POLICIES:
                raise ValueError(f"unknown weight-decay policy {policy!r} in {config!r}")
            flags += ["--sv-weight-decay-policy", policy]
        else:
            raise ValueError(f"unknown modifier {m!r} in {config!r} (qk, post, wd=<policy>)")
    return flags


def wd_study_configs(policies: List[str]) -> List[str]:
    return [f"{WD_STUDY_BASE}+wd={p}" for p in policies]


def base_flags(a) -> List[str]:
    """Model, optimization, data and logging flags shared by every run."""
    mbs = a.global_batch_size // (a.nproc if a.launcher == "torchrun" else 1)
    flags = [
        "--num-layers", a.num_layers, "--hidden-size", a.hidden_size,
        "--num-attention-heads", a.num_attention_heads,
        "--seq-length", a.seq_length, "--max-position-embeddings", a.seq_length,
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--init-method-std", "0.02",
        "--micro-batch-size", mbs, "--global-batch-size", a.global_batch_size,
        "--optimizer", a.optimizer, "--lr", a.lr, "--min-lr", a.min_lr, "--lr-decay-style", a.lr_decay_style,
        "--lr-warmup-iters", a.warmup, "--train-iters", a.iters, "--weight-decay", a.weight_decay,
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--data-path", a.data_path, "--split", a.split,
        "--log-interval", a.log_interval, "--eval-interval", a.eval_interval, "--eval-iters", a.eval_iters,
    ]
    if a.ffn_hidden_size:
        flags += ["--ffn-hidden-size", a.ffn_hidden_size]
    if a.lr_decay_style == "wsd":
        flags += ["--lr-wsd-decay-iters", a.wsd_decay_iters or max(1, a.iters // 5)]
    if a.tokenizer_model:
        flags += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", a.tokenizer_model]
    else:
        flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", a.vocab_size]
    return [str(f) for f in flags]


def run_command(a, config: str, seed: int, run_dir: str) -> List[str]:
    """The full command line of one run."""
    if a.launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
                  "--master-addr", "127.0.0.1", "--master-port", str(a.master_port)]
    else:
        launch = [sys.executable]
    return (launch + [os.path.join(REPO, "pretrain_gpt_sv.py")] + base_flags(a) + config_flags(config)
            + ["--seed", str(seed), "--metrics-file", os.path.join(run_dir, "metrics.jsonl"),
               "--tensorboard-dir", os.path.join(run_dir, "tensorboard")] + shlex.split(a.extra_args))


def run_dir_of(out: str, config: str, seed: int) -> str:
    return os.path.join(out, config, f"seed{seed}")


def is_finished(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "done.json"))


def plan(a) -> List[Dict]:
    """Runs in execution order: seed-major, so an interrupted sweep leaves complete seed sets."""
    configs = list(dict.fromkeys(a.configs + wd_study_configs(a.wd_study)))
    runs = []
    for seed in a.seeds:
        for c in configs:
            d = run_dir_of(a.out, c, seed)
            runs.append(dict(config=c, seed=seed, dir=d, cmd=run_command(a, c, seed, d)))
    return runs


def execute(run: Dict, env: Dict[str, str]) -> Dict:
    d = run["dir"]
    if os.path.exists(d):  # an unfinished run: metrics.jsonl is opened in append mode, so start clean
        shutil.rmtree(d)
    os.makedirs(d)
    with open(os.path.join(d, "command.json"), "w") as f:
        json.dump(dict(config=run["config"], seed=run["seed"], argv=run["cmd"],
                       shell=" ".join(shlex.quote(x) for x in run["cmd"])), f, indent=1)
    t0 = time.time()
    with open(os.path.join(d, "stdout.log"), "w") as log:
        rc = subprocess.call(run["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.time() - t0
    if rc == 0:
        with open(os.path.join(d, "done.json"), "w") as f:
            json.dump(dict(config=run["config"], seed=run["seed"], wall_s=wall, rc=rc), f)
    return dict(rc=rc, wall_s=wall)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="one sub-directory per configuration and seed")
    p.add_argument("--configs", nargs="*", default=["none", "standard", "hg", "dp", "dnp", "or", "er", "unified",
                                                    "standard+qk"])
    p.add_argument("--wd-study", nargs="*", default=[], choices=WD_POLICIES,
                   help=f"also run {WD_STUDY_BASE}+wd=<policy> for these policies")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    g = p.add_argument_group("shared model / optimization (identical for every run)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--iters", type=int, default=200)
    g.add_argument("--optimizer", default="adam", choices=["adam", "muon"])
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "wsd", "linear", "constant"])
    g.add_argument("--wsd-decay-iters", type=int, default=None)
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=20)
    g.add_argument("--data-path", default=None, help="indexed dataset prefix; default: mock data")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece model (else NullTokenizer)")
    g.add_argument("--vocab-size", type=int, default=8000, help="NullTokenizer vocabulary (mock data)")
    g.add_argument("--extra-args", default="", help="appended to every run's command line")
    l = p.add_argument_group("launch")
    l.add_argument("--launcher", default="single", choices=["single", "torchrun"],
                   help="single: one process (DP1); torchrun: --nproc gloo ranks (DP)")
    l.add_argument("--nproc", type=int, default=2)
    l.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process "
                   "(default: 2 for single, 1 per rank for torchrun)")
    l.add_argument("--master-port", type=int, default=29547)
    l.add_argument("--deadline-minutes", type=float, default=None,
                   help="start no new run after this many minutes (rerun the command to continue)")
    l.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    if a.data_path is None:
        a.extra_args = (a.extra_args + " --mock-data").strip()
        a.data_path = "mock"
    if a.global_batch_size % (a.nproc if a.launcher == "torchrun" else 1):
        p.error("--global-batch-size must be divisible by --nproc")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    runs = plan(a)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    # on a shared, oversubscribed CPU, spinning OpenMP threads stall each other (seconds per step);
    # passive waiting keeps a step at its uncontended cost plus the other load's share
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["OMP_NUM_THREADS"] = str(a.threads or (1 if a.launcher == "torchrun" else 2))
    if a.dry_run:
        for r in runs:
            state = "done" if is_finished(r["dir"]) else "todo"
            print(f"# {r['config']} seed {r['seed']} [{state}]\n" + " ".join(shlex.quote(x) for x in r["cmd"]))
        return 0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sweep.json"), "w") as f:
        json.dump(dict(argv=sys.argv, args={k: v for k, v in vars(a).items()},
                       runs=[dict(config=r["config"], seed=r["seed"], dir=os.path.relpath(r["dir"], a.out))
                             for r in runs]), f, indent=1)
    t_start = time.time()
    failed = []
    todo = [r for r in runs if not is_finished(r["dir"])]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished", flush=True)
    for i, r in enumerate(todo):
        if a.deadline_minutes is not None and (time.time() - t_start) / 60 > a.deadline_minutes:
            print(f"deadline of {a.deadline_minutes} min reached: {len(todo) - i} runs left; rerun to continue")
            break
        res = execute(r, env)
        status = "ok" if res["rc"] == 0 else f"FAILED rc={res['rc']} (see {r['dir']}/stdout.log)"
        print(f"[{i + 1}/{len(todo)}] {r['config']} seed {r['seed']}: {res['wall_s']:.0f} s {status} "
              f"(sweep {(time.time() - t_start) / 60:.1f} min)", flush=True)
        if res["rc"] != 0:
            failed.append(r)
    print(f"sweep wall time {(time.time() - t_start) / 60:.1f} min; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
