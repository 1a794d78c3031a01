"""A study file and the runs it implies.

A study is a JSON file (examples/studies/*.json, examples/paper_scales/study_*.json) with up to four
stages, planned in this order:

  sweep          a grid of learning rates per configuration on one fixed seed; the best LR of a
                 configuration is the one with the lowest final validation loss (diverged runs count as
                 +inf; ties go to the smaller LR). If the best LR sits at an edge of the grid, the grid is
                 extended by one more point beyond that edge (same ratio), up to `max_extensions` times.
  compare        every configuration at its own best LR with paired seeds (seed k = the same data order and
                 initial weights in every configuration). A configuration that is not swept takes the best
                 LR of the configuration named in `lr_from`, or the fixed `lr`.
  efficiency     the reference configuration trained at other token budgets (each its own run: the LR
                 schedule spans the run's budget), same seeds, at the reference's best LR; the report finds
                 how many tokens the reference needs to reach each configuration's final validation loss.
  weight_decay   `<base>+wd=<policy>` for each policy, paired seeds, optionally longer and with its own flags.

A configuration is a strategy with '+'-joined modifiers: `standard+qk` (QK-norm), `standard+qk+post`
(post-sub-layer norms), `...+wd=iwd` (scale-vector weight-decay policy).

A run is identified by (configuration, LR, iterations, seed, stage tag); two stages that need the same run
share it (the sweep's best-LR run on the sweep seed is the comparison's run on that seed; the comparison's
reference runs are the efficiency study's 1x budget). The plan is a pure function of the study and the
results known so far, so the runner and the report derive the same stages and best LRs from the same files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# The strategy names of megatron_sv.scale_vectors.config.STRATEGIES, repeated here so that planning a
# study does not import Megatron-Core (seconds; the submit job of a cluster study runs on a login node).
# tests/tools/test_study_spec.py checks that both lists are equal.
STRATEGIES = ("none", "standard", "hg", "dp", "dnp", "or", "er", "iwd", "unified")
WEIGHT_DECAY_POLICIES = ("megatron", "all", "none", "iwd")
# flags the runner sets per run: a study's shared flags must not contain them
MANAGED_FLAGS = (
    "--lr",
    "--min-lr",
    "--train-iters",
    "--lr-warmup-iters",
    "--seed",
    "--metrics-file",
    "--tensorboard-dir",
    "--save",
    "--load",
    "--save-interval",
    "--scale-vector-strategy",
    "--lr-wsd-decay-iters",
    "--lr-decay-iters",
)


class StudyError(ValueError):
    """A study file that cannot be planned (one line, names the field)."""


# ---------------------------------------------------------------------------------------------- configs
def config_flags(config: str) -> Tuple[str, List[str]]:
    """(strategy, extra CLI flags) of a configuration name such as `standard+qk+post+wd=iwd`."""
    strategy, *mods = config.split("+")
    if strategy not in STRATEGIES:
        raise StudyError(
            f"unknown strategy {strategy!r} in configuration {config!r} (choose from {', '.join(STRATEGIES)})"
        )
    flags: List[str] = []
    for m in mods:
        if m == "qk":
            flags.append("--qk-layernorm")
        elif m == "post":
            flags.append("--sv-post-sublayer-norm")
        elif m.startswith("wd=") and m[3:] in WEIGHT_DECAY_POLICIES:
            flags += ["--sv-weight-decay-policy", m[3:]]
        else:
            raise StudyError(
                f"unknown modifier {m!r} in configuration {config!r} (qk, post, wd=<{'|'.join(WEIGHT_DECAY_POLICIES)}>)"
            )
    return strategy, flags


def lr_text(lr: float) -> str:
    return f"{lr:.3g}"


# ---------------------------------------------------------------------------------------------- study
def _fields(d: dict, where: str, required: Tuple[str, ...], optional: Tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise StudyError(f"{where} must be an object")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise StudyError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(required + optional)})")
    missing = [k for k in required if k not in d]
    if missing:
        raise StudyError(f"{where}: missing field(s) {', '.join(missing)}")
    return d


def _positive_lrs(lrs, where: str) -> Tuple[float, ...]:
    if not isinstance(lrs, list) or not lrs or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
        raise StudyError(f"{where}: a non-empty list of positive learning rates")
    return tuple(sorted(float(x) for x in lrs))


def _seeds(seeds, where: str) -> Tuple[int, ...]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise StudyError(f"{where}: a non-empty list of distinct integer seeds")
    return tuple(seeds)


@dataclass(frozen=True)
class Sweep:
    configs: Tuple[str, ...]
    lrs: Tuple[float, ...]
    seed: int
    max_extensions: int = 1


@dataclass(frozen=True)
class Compare:
    configs: Tuple[str, ...]
    seeds: Tuple[int, ...]
    lr_from: Dict[str, str] = field(default_factory=dict)
    lr: Optional[float] = None  # for configurations neither swept nor in lr_from


@dataclass(frozen=True)
class Efficiency:
    reference: str
    budgets: Tuple[float, ...]  # multiples of the study's iterations, besides 1
    configs: Tuple[str, ...]  # configurations to measure against the reference


@dataclass(frozen=True)
class WeightDecay:
    base: str
    policies: Tuple[str, ...]
    seeds: Tuple[int, ...]
    lr_from: Optional[str] = None
    lr: Optional[float] = None
    iters: Optional[int] = None
    extra_flags: Tuple[str, ...] = ()
    tag: str = ""

    @property
    def configs(self) -> Tuple[str, ...]:
        return tuple(f"{self.base}+wd={p}" for p in self.policies)


@dataclass(frozen=True)
class Slurm:
    script: str
    env: Dict[str, str]
    sbatch_args: Tuple[str, ...] = ()
    continue_sbatch_args: Tuple[str, ...] = ()
    max_attempts: int = 3


@dataclass(frozen=True)
class Study:
    name: str
    launcher: str  # local | slurm
    iters: int
    warmup: int
    tokens_per_step: int
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: Optional[float] = None
    save_interval: Optional[int] = None
    train_flags: Tuple[str, ...] = ()  # local: shared CLI flags of pretrain_gpt_sv.py
    nproc: int = 1  # local: 1 = one process, else torchrun with nproc gloo ranks
    threads: Optional[int] = None  # local: OMP_NUM_THREADS per process
    slurm: Optional[Slurm] = None
    sweep: Optional[Sweep] = None
    compare: Optional[Compare] = None
    efficiency: Optional[Efficiency] = None
    weight_decay: Optional[WeightDecay] = None
    description: str = ""

    def to_json(self) -> dict:
        def conv(x):  # None fields are left out: study_from_json reads them as absent
            if hasattr(x, "__dataclass_fields__"):
                return {k: conv(getattr(x, k)) for k in x.__dataclass_fields__ if getattr(x, k) is not None}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            return x

        return conv(self)


def _expand(value: str, where: str) -> str:
    """${VAR} from the environment; an unset variable is an error (a study must not run on a wrong path)."""

    def sub(m):
        if m.group(1) not in os.environ:
            raise StudyError(f"{where}: environment variable {m.group(1)} is not set (used as ${{{m.group(1)}}})")
        return os.environ[m.group(1)]

    return re.sub(r"\$\{(\w+)\}", sub, value)


def _flag_value(flags: Tuple[str, ...], name: str) -> Optional[str]:
    vals = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]
    return vals[-1] if vals else None


def study_from_json(d: dict, expand_env: bool = True) -> Study:
    top = _fields(
        d,
        "study",
        ("name", "launcher", "iters", "warmup"),
        (
            "description",
            "min_lr_ratio",
            "wsd_decay_fraction",
            "save_interval",
            "train_flags",
            "nproc",
            "threads",
            "slurm",
            "sweep",
            "compare",
            "efficiency",
            "weight_decay",
            "tokens_per_step",
        ),
    )
    if top["launcher"] not in ("local", "slurm"):
        raise StudyError("study: launcher must be 'local' or 'slurm'")
    if not isinstance(top["iters"], int) or top["iters"] < 1:
        raise StudyError("study: iters must be a positive integer")
    if not isinstance(top["warmup"], int) or not 0 <= top["warmup"] < top["iters"]:
        raise StudyError("study: warmup must be an integer in [0, iters)")
    ex = (lambda v, w: _expand(v, w)) if expand_env else (lambda v, w: v)
    flags = tuple(ex(str(f), "study.train_flags") for f in top.get("train_flags", []))
    for f in flags:
        if f in MANAGED_FLAGS:
            raise StudyError(f"study.train_flags: {f} is set per run by the runner; remove it")
    slurm = None
    tokens_per_step = top.get("tokens_per_step")
    if top["launcher"] == "slurm":
        if "slurm" not in top:
            raise StudyError("study: launcher 'slurm' needs a 'slurm' object (script, env, sbatch_args)")
        s = _fields(
            top["slurm"], "study.slurm", ("script", "env"), ("sbatch_args", "continue_sbatch_args", "max_attempts")
        )
        env = {k: ex(str(v), f"study.slurm.env.{k}") for k, v in s["env"].items()}
        for k in ("GBS", "SEQ"):
            if k not in env:
                raise StudyError(f"study.slurm.env: set {k} explicitly (the report counts tokens from it)")
        for k in ("STRATEGY", "LR", "MIN_LR", "SEED", "TRAIN_ITERS", "WARMUP", "SAVE_DIR", "EXTRA_ARGS"):
            if k in env:
                raise StudyError(f"study.slurm.env: {k} is set per run by the runner; remove it")
        slurm = Slurm(
            s["script"],
            env,
            tuple(s.get("sbatch_args", [])),
            tuple(s.get("continue_sbatch_args", [])),
            int(s.get("max_attempts", 3)),
        )
        tokens_per_step = int(env["GBS"]) * int(env["SEQ"])
    elif tokens_per_step is None:
        gbs, seq = _flag_value(flags, "--global-batch-size"), _flag_value(flags, "--seq-length")
        if gbs is None or seq is None:
            raise StudyError("study.train_flags: give --global-batch-size and --seq-length (tokens per step)")
        tokens_per_step = int(gbs) * int(seq)
    if top["launcher"] == "local":
        ei = _flag_value(flags, "--eval-iters")
        if ei is None or int(ei) < 1:
            raise StudyError("study.train_flags: --eval-iters must be >= 1 (the study compares validation losses)")

    sweep = compare = eff = wd = None
    if "sweep" in top:
        s = _fields(top["sweep"], "study.sweep", ("configs", "lrs", "seed"), ("max_extensions",))
        sweep = Sweep(
            tuple(s["configs"]),
            _positive_lrs(s["lrs"], "study.sweep.lrs"),
            int(s["seed"]),
            int(s.get("max_extensions", 1)),
        )
        if len(sweep.lrs) < 2:
            raise StudyError("study.sweep.lrs: at least 2 learning rates")
    if "compare" in top:
        c = _fields(top["compare"], "study.compare", ("configs", "seeds"), ("lr_from", "lr"))
        compare = Compare(
            tuple(c["configs"]), _seeds(c["seeds"], "study.compare.seeds"), dict(c.get("lr_from", {})), c.get("lr")
        )
        swept = set(sweep.configs) if sweep else set()
        for cfg in compare.configs:
            src = compare.lr_from.get(cfg)
            if cfg in swept:
                if src is not None:
                    raise StudyError(f"study.compare.lr_from: {cfg!r} is swept; it uses its own best LR")
            elif src is not None:
                if src not in swept:
                    raise StudyError(f"study.compare.lr_from: {cfg!r} takes the LR of {src!r}, which is not swept")
            elif compare.lr is None:
                raise StudyError(f"study.compare: {cfg!r} is not swept: give lr_from.{cfg} or a fixed lr")
        if sweep and sweep.seed not in compare.seeds:
            raise StudyError("study.compare.seeds must include the sweep seed (its best-LR run is reused)")
    if "efficiency" in top:
        e = _fields(top["efficiency"], "study.efficiency", ("reference", "budgets"), ("configs",))
        if compare is None or e["reference"] not in compare.configs:
            raise StudyError("study.efficiency.reference must be one of study.compare.configs (its 1x runs)")
        budgets = tuple(sorted(float(b) for b in e["budgets"]))
        if not budgets or any(b <= 0 or b == 1 for b in budgets):
            raise StudyError(
                "study.efficiency.budgets: positive multiples of iters other than 1 (1x is the comparison's run)"
            )
        cfgs = tuple(e.get("configs", [c for c in compare.configs if c != e["reference"]]))
        for cfg in cfgs:
            if cfg not in compare.configs:
                raise StudyError(f"study.efficiency.configs: {cfg!r} is not in study.compare.configs")
        eff = Efficiency(e["reference"], budgets, cfgs)
    if "weight_decay" in top:
        w = _fields(
            top["weight_decay"],
            "study.weight_decay",
            ("base", "policies", "seeds"),
            ("lr_from", "lr", "iters", "extra_flags", "tag"),
        )
        wd = WeightDecay(
            w["base"],
            tuple(w["policies"]),
            _seeds(w["seeds"], "study.weight_decay.seeds"),
            w.get("lr_from"),
            w.get("lr"),
            w.get("iters"),
            tuple(ex(str(f), "study.weight_decay.extra_flags") for f in w.get("extra_flags", [])),
            w.get("tag", ""),
        )
        if "megatron" not in wd.policies:
            raise StudyError("study.weight_decay.policies must include 'megatron' (the reference)")
        if (wd.lr_from is None) == (wd.lr is None):
            raise StudyError("study.weight_decay: give exactly one of lr_from (a compared configuration) or lr")
        if wd.lr_from is not None and (compare is None or wd.lr_from not in compare.configs):
            raise StudyError(f"study.weight_decay.lr_from: {wd.lr_from!r} is not in study.compare.configs")
        if (wd.extra_flags or wd.iters) and not re.fullmatch(r"[A-Za-z0-9.=-]+", wd.tag or ""):
            raise StudyError(
                "study.weight_decay: a tag (letters, digits, . = -) is required with extra_flags or "
                "iters, so its runs are not confused with other runs"
            )
        for f in wd.extra_flags:
            if f in MANAGED_FLAGS:
                raise StudyError(f"study.weight_decay.extra_flags: {f} is set per run by the runner")
    if not any((sweep, compare, wd)):
        raise StudyError("study: nothing to run (give sweep, compare and/or weight_decay)")
    study = Study(
        name=top["name"],
        launcher=top["launcher"],
        iters=top["iters"],
        warmup=top["warmup"],
        tokens_per_step=int(tokens_per_step),
        min_lr_ratio=float(top.get("min_lr_ratio", 0.1)),
        wsd_decay_fraction=top.get("wsd_decay_fraction"),
        save_interval=top.get("save_interval"),
        train_flags=flags,
        nproc=int(top.get("nproc", 1)),
        threads=top.get("threads"),
        slurm=slurm,
        sweep=sweep,
        compare=compare,
        efficiency=eff,
        weight_decay=wd,
        description=top.get("description", ""),
    )
    for cfg in all_configs(study):
        config_flags(cfg)
    return study


def load_study(path: str, expand_env: bool = True) -> Study:
    if not os.path.isfile(path):
        raise StudyError(f"study file {path} does not exist")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise StudyError(f"study file {path} is not valid JSON: {e}") from None
    return study_from_json(d, expand_env)


def all_configs(study: Study) -> List[str]:
    out: List[str] = []
    for stage in (study.sweep, study.compare, study.weight_decay):
        if stage is not None:
            out += list(stage.configs)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    config: str
    lr: float
    seed: int
    iters: int
    tag: str = ""
    extra_flags: Tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.config}_lr{lr_text(self.lr)}_it{self.iters}_s{self.seed}" + (f"_{self.tag}" if self.tag else "")


@dataclass
class Plan:
    """Runs known so far, by stage, plus what the stages still wait for."""

    runs: Dict[str, Run] = field(default_factory=dict)  # id -> run, in planning order
    stages: Dict[str, List[str]] = field(default_factory=dict)  # stage -> run ids
    best_lr: Dict[str, float] = field(default_factory=dict)  # swept config -> best LR
    lr_of: Dict[str, Tuple[float, str]] = field(default_factory=dict)  # compared config -> (LR, source)
    at_edge: Dict[str, str] = field(default_factory=dict)  # swept config -> 'low'/'high' if unresolved
    waiting: List[str] = field(default_factory=list)  # human-readable reasons

    def add(self, stage: str, run: Run) -> None:
        old = self.runs.get(run.id)
        if old is not None and old != run:
            raise StudyError(
                f"two different runs would share the directory {run.id} (give the weight_decay stage a tag)"
            )
        self.runs.setdefault(run.id, run)
        ids = self.stages.setdefault(stage, [])
        if run.id not in ids:
            ids.append(run.id)


# the outcome of a run as the planner needs it: None = not finished; +inf = diverged; else final valid loss
Outcome = Callable[[Run], Optional[float]]


def _select(losses: Dict[float, float]) -> float:
    return min(sorted(losses), key=lambda lr: losses[lr])  # sorted: ties go to the smaller LR


def _sweep_lr(study: Study, plan: Plan, config: str, outcome: Outcome) -> Optional[float]:
    sw = study.sweep
    lrs = list(sw.lrs)
    extensions = 0
    while True:
        losses = {}
        for lr in lrs:
            run = Run(config, lr, sw.seed, study.iters)
            plan.add("sweep", run)
            losses[lr] = outcome(run)
        if any(v is None for v in losses.values()):
            plan.waiting.append(f"sweep of {config}")
            return None
        if all(math.isinf(v) for v in losses.values()):
            raise StudyError(
                f"every LR of the sweep of {config} diverged ({', '.join(map(lr_text, lrs))}): lower the grid"
            )
        best = _select(losses)
        edge = "low" if best == lrs[0] else "high" if best == lrs[-1] else None
        if edge is None or extensions >= sw.max_extensions:
            if edge:
                plan.at_edge[config] = edge
            return best
        extensions += 1
        ratio = (lrs[1] / lrs[0]) if edge == "low" else (lrs[-1] / lrs[-2])
        new = float(lr_text(lrs[0] / ratio if edge == "low" else lrs[-1] * ratio))
        lrs = sorted(lrs + [new])


def plan_study(study: Study, outcome: Outcome) -> Plan:
    plan = Plan()
    if study.sweep:
        for c in study.sweep.configs:
            lr = _sweep_lr(study, plan, c, outcome)
            if lr is not None:
                plan.best_lr[c] = lr
    if study.compare:
        cmp = study.compare
        for c in cmp.configs:
            if c in plan.best_lr:
                plan.lr_of[c] = (plan.best_lr[c], "own sweep")
            elif c in cmp.lr_from:
                if cmp.lr_from[c] in plan.best_lr:
                    plan.lr_of[c] = (plan.best_lr[cmp.lr_from[c]], f"best LR of {cmp.lr_from[c]}")
            elif not (study.sweep and c in study.sweep.configs):
                plan.lr_of[c] = (float(cmp.lr), "fixed")
        for seed in cmp.seeds:  # seed-major: an interrupted study leaves complete seed sets
            for c in cmp.configs:
                if c in plan.lr_of:
                    plan.add("compare", Run(c, plan.lr_of[c][0], seed, study.iters))
        missing = [c for c in cmp.configs if c not in plan.lr_of]
        if missing:
            plan.waiting.append("comparison of " + ", ".join(missing) + " (LR not chosen yet)")
    if study.efficiency and study.efficiency.reference in plan.lr_of:
        eff = study.efficiency
        lr = plan.lr_of[eff.reference][0]
        for seed in study.compare.seeds:
            plan.add("efficiency", Run(eff.reference, lr, seed, study.iters))
            for b in eff.budgets:
                plan.add("efficiency", Run(eff.reference, lr, seed, budget_iters(study.iters, b)))
    elif study.efficiency:
        plan.waiting.append(f"efficiency (LR of {study.efficiency.reference} not chosen yet)")
    if study.weight_decay:
        wd = study.weight_decay
        lr = wd.lr if wd.lr is not None else plan.lr_of.get(wd.lr_from, (None,))[0]
        if lr is None:
            plan.waiting.append(f"weight-decay study (LR of {wd.lr_from} not chosen yet)")
        else:
            for seed in wd.seeds:
                for c in wd.configs:
                    plan.add("weight_decay", Run(c, float(lr), seed, wd.iters or study.iters, wd.tag, wd.extra_flags))
    return plan


def budget_iters(iters: int, multiple: float) -> int:
    return max(1, int(round(iters * multiple)))


def hypothetical_outcome(study: Study) -> Outcome:
    """An outcome for estimating a study's size before it runs: every sweep's best LR is an interior grid point
    (no extension) and every run completes."""

    def outcome(run: Run) -> float:
        lrs = study.sweep.lrs if study.sweep else (run.lr,)
        mid = lrs[len(lrs) // 2]
        return abs(math.log(run.lr / mid))

    return outcome
