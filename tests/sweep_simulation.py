"""Simulated sweeps with a known true difference, for checking the verdict statistics.

Each method's score on test example e with training seed s is 1 when
    theta_e + delta_method + u_(method, e) + alpha_(method, s) + noise * v_(method, s, e) > 0,
all terms independent standard normals scaled as named: theta_e how easy the example is (shared
by every method: what makes pairing informative), u a method's own per-example strengths,
alpha a whole-seed shift (one seed trains better), v per-example noise between seeds. Over all
examples and seeds a method scores Phi(delta / sqrt(1 + u^2 + alpha^2 + noise^2)), so the true
difference between two methods is known exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Regime:
    u: float = 0.5        # sd of a method's own per-example effects
    alpha: float = 0.1    # sd of whole-seed shifts
    noise: float = 0.5    # sd of per-example noise between seeds

    def score(self, delta: float) -> float:
        return float(stats.norm.cdf(delta / math.sqrt(1 + self.u**2 + self.alpha**2 + self.noise**2)))

    def delta_for(self, difference: float) -> float:
        """The delta that makes a method score `difference` above a delta-0 baseline."""
        scale = math.sqrt(1 + self.u**2 + self.alpha**2 + self.noise**2)
        return float(stats.norm.ppf(0.5 + difference) * scale)


def sweep(rng: np.random.Generator, regime: Regime, deltas, seeds: int, examples: int) -> list[np.ndarray]:
    """One simulated sweep: for each method's delta, a (seeds x examples) array of 0/1 scores."""
    theta = rng.normal(0, 1, examples)
    return [(theta + d + rng.normal(0, regime.u, examples) + rng.normal(0, regime.alpha, (seeds, 1))
             + regime.noise * rng.normal(0, 1, (seeds, examples)) > 0).astype(float) for d in deltas]
