"""Which interval to trust: coverage and power of three ways to compare a method with QLoRA, on
simulated sweeps with a known true difference (tests/sweep_simulation.py).

    python benchmarks/verdict_statistics.py            # the committed run (about a minute)
    python benchmarks/verdict_statistics.py --sweeps 100

  paired      the report's interval (harness/report/statistics.py): variance over test examples
              of the paired, seed-averaged difference plus whole-seed variance beyond per-example
              noise, t with Satterthwaite's degrees of freedom
  bootstrap   a hierarchical paired bootstrap: each replicate resamples each method's seeds and,
              for all of them and both methods alike, the test examples; 95% percentile interval
  seed-only   Welch's interval over the seeds' job scores (the test set taken as fixed)

For each regime (seeds x examples, and how the seeds differ) and a true difference of 5 points:
coverage (share of sweeps whose 95% interval holds the true difference; 95% is right) and power
(share whose interval excludes zero). Results: benchmarks/results/verdict_statistics.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from sweep_simulation import Regime, sweep  # noqa: E402

from harness.report import statistics  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
REGIMES = [  # (label, regime, seeds, examples)
    ("some whole-seed shift and per-example noise", Regime(), 3, 200),
    ("large whole-seed shifts", Regime(alpha=0.3), 3, 200),
    ("whole-seed shifts dominate", Regime(alpha=0.3, noise=0.1), 3, 200),
    ("seeds nearly agree", Regime(alpha=0.0, noise=0.1), 3, 200),
    ("per-example noise dominates", Regime(u=0.1, alpha=0.0, noise=1.0), 3, 500),
    ("per-example noise dominates, 2 seeds", Regime(u=0.1, alpha=0.0, noise=1.0), 2, 500),
]


def bootstrap(xa: np.ndarray, xb: np.ndarray, rng: np.random.Generator, replicates: int) -> tuple[float, float]:
    m = xa.shape[1]
    counts = rng.multinomial(m, np.full(m, 1 / m), size=replicates)  # examples, shared by both methods

    def mean(x):
        seeds = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=replicates)
        return (seeds * (x @ counts.T / m).T).sum(axis=1) / len(x)

    lo, hi = np.percentile(mean(xa) - mean(xb), [2.5, 97.5])
    return float(lo), float(hi)


def welch(xa: np.ndarray, xb: np.ndarray) -> tuple[float, float]:
    a, b = xa.mean(axis=1), xb.mean(axis=1)
    w = statistics.welch(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b))
    return w.lo, w.hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=300)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    lines = ["# Verdict statistics on simulated sweeps", "",
             f"`python benchmarks/verdict_statistics.py` ({args.sweeps} sweeps per regime, bootstrap "
             f"{args.replicates} replicates, true difference 5 points). Coverage: share of 95% intervals holding "
             "the true difference (0.95 is right). Power: share excluding zero. Regimes: "
             "tests/sweep_simulation.py (u: per-method per-example effects, alpha: whole-seed shifts, "
             "noise: per-example noise between seeds).", "",
             "| regime | seeds x examples | coverage: paired | bootstrap | seed-only | power: paired | bootstrap | seed-only |",
             "|---|---|---|---|---|---|---|---|"]
    for label, regime, seeds, examples in REGIMES:
        rng = np.random.default_rng(2026)
        delta = regime.delta_for(0.05)
        truth = regime.score(delta) - regime.score(0.0)
        covered, power = np.zeros(3), np.zeros(3)
        for _ in range(args.sweeps):
            xa, xb = sweep(rng, regime, (delta, 0.0), seeds, examples)
            ci = statistics.interval(statistics.components(xa, xb))
            for k, (lo, hi) in enumerate([(ci.lo, ci.hi), bootstrap(xa, xb, rng, args.replicates), welch(xa, xb)]):
                covered[k] += lo <= truth <= hi
                power[k] += lo > 0 or hi < 0
        c, p = covered / args.sweeps, power / args.sweeps
        lines.append(f"| {label} (u={regime.u}, alpha={regime.alpha}, noise={regime.noise}) | {seeds} x {examples} | "
                     + " | ".join(f"{v:.3f}" for v in (*c, *p)) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "verdict_statistics.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
