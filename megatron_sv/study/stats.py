"""Statistics of a study: paired differences with 95% intervals, and the compute-efficiency estimate.

Paired: a configuration and its reference on the same seed see the same data order and start from the
same shared weights, so the per-seed difference removes the seed's own noise. With n seeds we report the
mean difference, a 95% Student-t interval (mean +- t_{0.975,n-1} s/sqrt(n)), a percentile bootstrap
interval over seeds (coarse for small n: with 3 seeds there are only 10 distinct resamples), and on how
many seeds the difference has the sign of the mean.

Compute efficiency (the paper's headline metric): the reference is trained at several token budgets T_i
(each its own run). Its final validation losses L(T_i), made non-increasing (isotonic fit), are interpolated
linearly in log T; the efficiency of a configuration with final loss L_c at budget T_1 is T*/T_1 where
L(T*) = L_c: how many times more tokens the reference needs to match it. A loss outside the measured range
gives only a bound ("> largest budget" or "< smallest budget").
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


# ---------------------------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of t_cdf by bisection (p in (0, 1))."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------- intervals
def t_interval(values: Sequence[float], level: float = 0.95) -> Optional[Tuple[float, float]]:
    if len(values) < 2:
        return None
    m, s = statistics.fmean(values), statistics.stdev(values)
    h = t_quantile(0.5 + level / 2.0, len(values) - 1) * s / math.sqrt(len(values))
    return m - h, m + h


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 10000, seed: int = 0, statistic=statistics.fmean
) -> Optional[Tuple[float, float]]:
    """Percentile interval of `statistic` over resamples of the values (with replacement); fixed RNG seed,
    so a report regenerates identically."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(statistic([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    return _percentiles(stats, level)


def _percentiles(sorted_stats: List[float], level: float) -> Tuple[float, float]:
    k = len(sorted_stats)
    lo = sorted_stats[max(0, int(math.floor((1 - level) / 2 * k)))]
    hi = sorted_stats[min(k - 1, int(math.ceil((1 + level) / 2 * k)) - 1)]
    return lo, hi


@dataclass
class Paired:
    seeds: List[int]
    diffs: List[float]
    mean: Optional[float]
    std: Optional[float]
    t_ci: Optional[Tuple[float, float]]
    boot_ci: Optional[Tuple[float, float]]
    agree: int  # seeds whose difference has the sign of the mean (0 when the mean is 0)

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired(values: Dict[int, float], reference: Dict[int, float]) -> Paired:
    """value - reference over the seeds both have (finite values only)."""
    seeds = sorted(s for s in values if s in reference and math.isfinite(values[s]) and math.isfinite(reference[s]))
    d = [values[s] - reference[s] for s in seeds]
    mean = statistics.fmean(d) if d else None
    sign = 0 if not mean else (1 if mean > 0 else -1)
    return Paired(
        seeds,
        d,
        mean,
        statistics.stdev(d) if len(d) > 1 else None,
        t_interval(d),
        bootstrap_interval(d),
        sum(1 for x in d if x * sign > 0),
    )


# ---------------------------------------------------------------------------------------------- efficiency
def isotonic_decreasing(ys: Sequence[float]) -> List[float]:
    """Least-squares non-increasing fit (pool adjacent violators)."""
    blocks: List[List[float]] = []  # [mean, weight]
    for y in ys:
        blocks.append([float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: List[float] = []
    for m, w in blocks:
        out += [m] * int(w)
    return out


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], target: float) -> float:
    """T with L(T) = target on the isotonic reference curve, linear in log T; +inf beyond the largest budget,
    0.0 below the smallest (bounds, not values)."""
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    ts = [float(tokens[i]) for i in order]
    ls = isotonic_decreasing([losses[i] for i in order])
    if target > ls[0]:
        return 0.0
    if target < ls[-1]:
        return math.inf
    for i in range(len(ts) - 1):
        if ls[i] >= target >= ls[i + 1]:
            if ls[i] == ls[i + 1]:
                return ts[i]
            f = (ls[i] - target) / (ls[i] - ls[i + 1])
            return math.exp(math.log(ts[i]) + f * (math.log(ts[i + 1]) - math.log(ts[i])))
    return ts[0]  # target == ls[0] with a single budget


@dataclass
class Efficiency:
    estimate: float  # from the seed-mean curves
    per_seed: Dict[int, float]
    t_ci: Optional[Tuple[float, float]]  # over per-seed ratios, when none is a bound
    boot_ci: Optional[Tuple[float, float]]
    range: Tuple[float, float]  # the measured budget range, as ratios


def efficiency(
    ref: Dict[int, Dict[float, float]],
    target: Dict[int, float],
    base_tokens: float,
    resamples: int = 10000,
    seed: int = 0,
) -> Optional[Efficiency]:
    """ref: seed -> {tokens: final valid loss}; target: seed -> the configuration's final valid loss at
    base_tokens. Only seeds with every budget and a target are used."""
    budgets = sorted(set.intersection(*[set(v) for v in ref.values()])) if ref else []
    seeds = sorted(s for s in target if s in ref and all(b in ref[s] for b in budgets) and math.isfinite(target[s]))
    if len(budgets) < 2 or not seeds:
        return None

    def ratio(ss: Sequence[int]) -> float:
        curve = [statistics.fmean(ref[s][b] for s in ss) for b in budgets]
        return tokens_to_reach(budgets, curve, statistics.fmean(target[s] for s in ss)) / base_tokens

    per_seed = {s: ratio([s]) for s in seeds}
    finite = [v for v in per_seed.values() if 0.0 < v < math.inf]
    rng = random.Random(seed)
    boot = None
    if len(seeds) > 1:
        boot = _percentiles(
            sorted(ratio([seeds[rng.randrange(len(seeds))] for _ in seeds]) for _ in range(resamples)), 0.95
        )
    return Efficiency(
        ratio(seeds),
        per_seed,
        t_interval(finite) if len(finite) == len(seeds) else None,
        boot,
        (budgets[0] / base_tokens, budgets[-1] / base_tokens),
    )
