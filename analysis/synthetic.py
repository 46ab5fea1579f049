"""Runs tables drawn from a known Chinchilla law: ground truth for tests, the benchmark and the notebook."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.parametric import ChinchillaLaw

# Two families about 16x apart in compute where their losses meet, the MDM's N* about half the ARM's, in the
# paper's range of budgets and losses (docs/method.md §8)
TRUTH = {"arm": ChinchillaLaw(E=1.80, A=480.0, B=2100.0, alpha=0.35, beta=0.37),
         "mdm": ChinchillaLaw(E=1.85, A=600.0, B=4200.0, alpha=0.35, beta=0.37)}
BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20)


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
