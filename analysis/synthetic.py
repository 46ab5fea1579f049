"""Runs tables drawn from a known Chinchilla law, or a data-constrained one: ground truth for tests, the benchmark
and the notebook."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from analysis.data_constrained import DataConstrainedLaw
from analysis.parametric import ChinchillaLaw

# Two families about 16x apart in compute where their losses meet, the MDM's N* about half the ARM's, in the
# paper's range of budgets and losses (docs/method.md §8)
TRUTH = {"arm": ChinchillaLaw(E=1.80, A=480.0, B=2100.0, alpha=0.35, beta=0.37),
         "mdm": ChinchillaLaw(E=1.85, A=600.0, B=4200.0, alpha=0.35, beta=0.37)}
BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20)
# The same two families with repetition half-lives near those Prabhudesai et al. (2025) report: an MDM keeps
# gaining from repeated data far longer than an ARM
REPEATED_TRUTH = {name: DataConstrainedLaw(law.E, law.A, law.B, law.alpha, law.beta, rd_star=rd_star)
                  for (name, law), rd_star in zip(TRUTH.items(), (15.0, 500.0))}


def synthetic_runs(laws: dict[str, ChinchillaLaw] | None = None, budgets=BUDGETS, sizes: int = 7,
                   spread: float = 4.0, noise: float = 0.005, seed: int = 0) -> pd.DataFrame:
    """`sizes` model sizes per budget, from N*/spread to N*·spread around the law's optimum, D = C/(6N),
    loss = L(N, D)·exp(noise·z) with z standard normal."""
    rng = np.random.default_rng(seed)
    rows = []
    for family, law in (laws or TRUTH).items():
        log_n, a, _, _ = law.allocation()
        for c in budgets:
            n_opt = np.exp(log_n) * c ** a
            for n in n_opt * np.geomspace(1 / spread, spread, sizes):
                d = c / (6 * n)
                rows.append({"family": family, "budget": c, "params": n, "tokens": d,
                             "loss": float(law.loss(n, d) * np.exp(noise * rng.standard_normal()))})
    return pd.DataFrame(rows)


def repeated_runs(laws: dict[str, DataConstrainedLaw] | None = None, sizes=(1e8, 3e8, 1e9), unique=(1e9, 4e9),
                  epochs=(0.25, 1, 2, 4, 8, 16, 32, 64), noise: float = 0.005, seed: int = 0) -> pd.DataFrame:
    """Every model size trained for every number of epochs of every unique-data size U: tokens = epochs·U,
    budget = 6ND, loss = L(N, D, U)·exp(noise·z) with z standard normal."""
    rng = np.random.default_rng(seed)
    rows = []
    for family, law in (laws or REPEATED_TRUTH).items():
        for n, u, e in itertools.product(sizes, unique, epochs):
            rows.append({"family": family, "budget": 6 * n * e * u, "params": n, "tokens": e * u, "unique_tokens": u,
                         "loss": float(law.loss(n, e * u, u) * np.exp(noise * rng.standard_normal()))})
    return pd.DataFrame(rows)
