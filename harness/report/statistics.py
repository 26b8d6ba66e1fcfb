"""How sure a comparison is: the paired difference of two methods over seeds and test examples,
its 95% interval and p-value, Holm's correction, and the smallest difference a design can detect.

Every method is scored on the same test examples, so the comparison pairs them. For method A
(seeds s = 1..nA) and the baseline B (nB seeds), X[s, e] is seed s's score on example e (0/1 for
exact match and choice, the metric's value for ROUGE-L) over the m examples both were scored on.
The difference D = mean(XA) - mean(XB) estimates the methods' difference on the task (all of
its examples, any training seed), and its variance has two parts that add up:

- test examples: Var(d_e) / m, with d_e = mean_s XA[s, e] - mean_s XB[s, e] the seed-averaged
  paired difference on example e. It already holds the per-example noise between seeds (which
  examples a seed happens to get right), averaged over the seeds;
- training seeds, beyond that: for each method, the variance of its job scores over seeds minus
  what per-example noise explains (mean over examples of the variance over seeds, / m), at least
  zero, / n seeds. A method whose seeds shift every example together (one seed simply trains
  better) shows it here.

The interval is D +- t(df) * SE with Satterthwaite's degrees of freedom (m - 1 for the example
part; n - 1 for each seed part, weighted by the whole seed-to-seed variance it is estimated
from), so a sweep of 2 or 3 seeds whose seeds disagree as a whole gets
the wide interval it needs, while one whose seed-to-seed spread is per-example noise does not.
This is a two-way random-effects (method of moments) interval, not a bootstrap: a bootstrap
that resamples seeds and examples together counts the per-example seed noise twice (99-100%
coverage where it dominates), and percentiles of 2 or 3 resampled seeds lack the t correction
(88% where whole-seed shifts dominate): benchmarks/results/verdict_statistics.md.

With one seed of either method, nothing tells how a whole run varies with its seed: the interval
covers test-example sampling only (and says so). An interval with zero width (no variation seen
at all) is never taken as conclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL, POWER = 0.05, 0.80


@dataclass(frozen=True)
class Components:
    """What the data say about one pair's variance, enough to predict it for other designs."""
    diff: float            # D = mean(XA) - mean(XB)
    n_a: int               # seeds of the method
    n_b: int               # seeds of the baseline
    m: int                 # paired test examples
    paired_var: float      # Var over examples of the seed-averaged paired difference d_e
    noise_a: float         # mean over examples of the variance over seeds (NaN with one seed)
    noise_b: float
    seed_a: float          # seed-to-seed variance of job scores beyond per-example noise (>= 0; NaN: one seed)
    seed_b: float

    @property
    def example_var(self) -> float:
        """Var of the per-example true difference, the seeds' per-example noise taken out."""
        noise = sum(w / n for w, n in ((self.noise_a, self.n_a), (self.noise_b, self.n_b)) if n > 1)
        return max(0.0, self.paired_var - noise)


@dataclass(frozen=True)
class Interval:
    diff: float
    lo: float
    hi: float
    se: float
    df: float
    p: float
    seeds_included: bool   # False: one seed of a side, the interval covers test examples only

    @property
    def conclusive(self) -> bool:
        """Whether the interval says anything: a zero-width one (no variation seen) does not."""
        return self.se > 0 and math.isfinite(self.se)


def components(xa: np.ndarray, xb: np.ndarray) -> Components:
    """`xa`, `xb`: scores, one row per seed, one column per test example, the columns of both
    naming the same examples in the same order."""
    xa, xb = np.asarray(xa, dtype=float), np.asarray(xb, dtype=float)
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1] or xa.shape[1] == 0:
        raise ValueError(f"need two (seeds x examples) arrays over the same examples, got {xa.shape} and {xb.shape}")
    m = xa.shape[1]
    d = xa.mean(axis=0) - xb.mean(axis=0)
    parts = []
    for x in (xa, xb):
        if len(x) < 2:
            parts += [math.nan, math.nan]
            continue
        noise, spread = float(x.var(axis=0, ddof=1).mean()), float(x.mean(axis=1).var(ddof=1))
        parts += [noise, max(0.0, spread - noise / m)]
    return Components(diff=float(xa.mean() - xb.mean()), n_a=len(xa), n_b=len(xb), m=m,
                      paired_var=float(d.var(ddof=1)) if m > 1 else 0.0,
                      noise_a=parts[0], seed_a=parts[1], noise_b=parts[2], seed_b=parts[3])


def _terms(c: Components, n_a: int, n_b: int, m: int) -> list[tuple[float, float, float]]:
    """The parts of Var(D) for a design of n_a, n_b seeds and m examples, predicted from the
    components `c` (measured on the same or another design): (variance, the mean square it is
    estimated from, that mean square's degrees of freedom)."""
    noise = sum(w / n for w, n in ((c.noise_a, n_a), (c.noise_b, n_b)) if not math.isnan(w))
    example = (c.example_var + noise) / m
    return [(example, example, m - 1)] + _seed_terms(c, n_a, n_b, m)


def _seed_terms(c: Components, n_a: int, n_b: int, m: int) -> list[tuple[float, float, float]]:
    """Each side's whole-seed part for n_a, n_b seeds: estimated as (seed-to-seed variance of
    job scores - per-example noise / m), so it carries that variance's n - 1 degrees of freedom."""
    return [(seed / n, (seed + noise / m) / n, n - 1)
            for seed, noise, n in ((c.seed_a, c.noise_a, n_a), (c.seed_b, c.noise_b, n_b))
            if not math.isnan(seed) and seed > 0]


def _satterthwaite(terms: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Total variance and Satterthwaite's degrees of freedom: each part is estimated from a
    mean square with its own degrees of freedom."""
    var = sum(v for v, _, _ in terms)
    denominator = sum(ms * ms / k for _, ms, k in terms if k > 0)
    return var, (var * var / denominator if denominator > 0 else math.inf)


def interval(c: Components) -> Interval:
    """D with its 95% interval and two-sided p-value (H0: no difference)."""
    var, df = _satterthwaite([(c.paired_var / c.m, c.paired_var / c.m, c.m - 1)] + _seed_terms(c, c.n_a, c.n_b, c.m))
    se = math.sqrt(var)
    seeds = c.n_a > 1 and c.n_b > 1
    if se == 0:
        return Interval(c.diff, c.diff, c.diff, 0.0, df, math.nan, seeds)
    half = float(stats.t.ppf(1 - LEVEL / 2, df)) * se
    p = float(2 * stats.t.sf(abs(c.diff) / se, df))
    return Interval(c.diff, c.diff - half, c.diff + half, se, df, p, seeds)


def welch(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int) -> Interval:
    """The seed-only comparison: difference of mean job scores with Welch's 95% interval and
    p-value (NaN interval unless both sides have 2+ seeds). It treats the test set as fixed."""
    diff = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return Interval(diff, math.nan, math.nan, math.nan, math.nan, math.nan, False)
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, 0.0, math.nan, math.nan, True)
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    half = float(stats.t.ppf(1 - LEVEL / 2, df)) * se
    return Interval(diff, diff - half, diff + half, se, df, float(2 * stats.t.sf(abs(diff) / se, df)), True)


def mean_interval_half_width(sd: float, n: int) -> float:
    """Half-width of the 95% t interval of a mean of n values (NaN for n < 2)."""
    return float(stats.t.ppf(1 - LEVEL / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted): a
    difference is significant at 5% for the whole family when its adjusted p < 0.05."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    k = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def detectable(se: float, df: float, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `level` finds with probability `power`
    given the difference's standard error `se` (normal approximation with t quantiles)."""
    if not (se > 0 and math.isfinite(se)):
        return math.nan
    df = df if df > 0 else math.inf
    return float((stats.t.ppf(1 - level / 2, df) + stats.t.ppf(power, df)) * se)


def detectable_for_design(c: Components, seeds: int, examples: int) -> float:
    """The smallest difference detectable (80% power, 5% level) with `seeds` seeds of each method
    and `examples` test examples, predicted from the components `c` of a pilot. With one seed the
    interval cannot see whole-seed shifts; the prediction still counts them in its SE."""
    terms = _terms(c, seeds, seeds, examples)
    var, df = _satterthwaite(terms if seeds > 1 else [(sum(v for v, _, _ in terms),) * 2 + (examples - 1,)])
    return detectable(math.sqrt(var), df)
