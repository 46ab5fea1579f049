"""Approach 3: the Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta (docs/method.md §6).

Minimise the *summed* Huber loss of LSE(a - alpha ln N, b - beta ln D, e) - ln L (E = e^e, A = e^a,
B = e^b) with L-BFGS from a grid of starts; bootstrap refits start from the full-data optimum.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from analysis.bootstrap import interval
from analysis.lbfgs import minimize_batched

NAMES = ("E", "A", "B", "alpha", "beta")
# start grid per parameter, in the optimiser's coordinates (a, b, e, alpha, beta)
GRID = {"a": np.arange(0, 26, 5.0), "b": np.arange(0, 26, 5.0), "e": np.arange(-1, 1.01, 0.5),
        "alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5)}
GRID_STAGE_ITERATIONS = 150  # enough for the grid to find the basins; the best few are then finished
POLISHED = 8


@dataclass(frozen=True)
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.asarray(n, dtype=float) ** self.alpha + self.B / np.asarray(d, dtype=float) ** self.beta

    @property
    def gamma(self) -> float:
        """Exponent of the compute-optimal frontier L*(C) = E + K·C^-gamma."""
        return self.alpha * self.beta / (self.alpha + self.beta)

    def allocation(self) -> tuple[float, float, float, float]:
        """(ln n, a, ln d, b) with N*(C) = e^n·C^a and D*(C) = e^d·C^b, minimising L at C = 6ND."""
        s = self.alpha + self.beta
        with np.errstate(all="ignore"):  # a degenerate bootstrap law (A or B at 0 or inf) gives inf/NaN, dropped later
            log_g = np.log(self.alpha * self.A / (self.beta * self.B)) / s
        a, b = self.beta / s, self.alpha / s
        return float(log_g - a * np.log(6)), a, float(-log_g - b * np.log(6)), b

    def frontier_k(self) -> float:
        """K of L*(C) = E + K·C^-gamma: the law evaluated along the optimal allocation."""
        log_n, a, log_d, b = self.allocation()
        with np.errstate(all="ignore"):
            return float(self.A * np.exp(-self.alpha * log_n) + self.B * np.exp(-self.beta * log_d))


@dataclass(frozen=True)
class ParametricFit:
    law: ChinchillaLaw
    objective: float
    delta: float
    ci: dict[str, tuple[float, float] | None]
    draws: np.ndarray  # (R, 5) bootstrap draws of (E, A, B, alpha, beta); NaN rows failed
    grid_edge: list[str]  # parameters fitted more than one grid step outside the start grid
    notes: list[str]

    def residuals(self, n, d, loss) -> np.ndarray:
        """ln L - ln L_hat, the quantity the Huber loss sees."""
        return np.log(loss) - np.log(self.law.loss(n, d))


def start_grid() -> np.ndarray:
    return np.array(list(itertools.product(*(GRID[k] for k in ("a", "b", "e", "alpha", "beta")))))


def huber_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float,
                    weights: np.ndarray | None = None, dtype=np.float64):
    """f(theta[rows], rows) -> (sum of weighted Huber losses, gradient) for rows of theta = (a, b, e, alpha, beta).

    float32 halves the cost where only the basin matters (the grid stage); results are float64.
    """
    log_n, log_d, log_l = (np.asarray(v, dtype=dtype) for v in (log_n, log_d, log_l))
    weights = None if weights is None else np.asarray(weights, dtype=dtype)

    cap = np.log(np.finfo(dtype).max) - 10  # keeps exp finite; rows that far out are rejected by the line search

    def f_and_grad(theta: np.ndarray, rows: np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            return _huber(theta.astype(dtype), rows)

    def _huber(theta: np.ndarray, rows: np.ndarray):
        a, b, e, alpha, beta = theta.T
        # LSE relative to e: ln(e^e + e^t1 + e^t2) = e + ln(1 + e^(t1-e) + e^(t2-e))
        x1 = np.multiply.outer(-alpha, log_n)
        x1 += (a - e)[:, None]
        np.exp(np.minimum(x1, cap, out=x1), out=x1)
        x2 = np.multiply.outer(-beta, log_d)
        x2 += (b - e)[:, None]
        np.exp(np.minimum(x2, cap, out=x2), out=x2)
        total = x1 + x2
        total += 1
        r = np.log(total)
        r += e[:, None] - log_l
        psi = np.clip(r, -delta, delta)  # Huber derivative
        r -= 0.5 * psi
        r *= psi  # now the Huber loss itself
        if weights is not None:
            w = weights[rows]
            r *= w
            psi *= w
        psi /= total
        x1 *= psi
        x2 *= psi
        grad = np.stack([x1.sum(1), x2.sum(1), psi.sum(1), -(x1 @ log_n), -(x2 @ log_d)], axis=1)
        return r.sum(1, dtype=np.float64), grad.astype(np.float64)
    return f_and_grad


def fit_parametric(params, tokens, loss, *, delta: float = 1e-3, counts: np.ndarray | None = None,
                   starts: np.ndarray | None = None, family: str = "") -> ParametricFit:
    """Fit the law from the start grid; with `counts` (R, runs) refit each bootstrap resample."""
    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    notes = []
    if len(log_l) < 5:
        raise ValueError(f"{family}: the parametric law has 5 parameters and needs >= 5 runs, got {len(log_l)}")
    if np.ptp(log_n + log_d) < np.log(1.2):
        notes.append(f"{family}: all runs have about the same N·D (one FLOP budget), so A, B, alpha and beta "
                     "are weakly determined")
    objective = huber_objective(log_n, log_d, log_l, delta)
    starts = start_grid() if starts is None else np.asarray(starts, dtype=float)
    coarse = minimize_batched(huber_objective(log_n, log_d, log_l, delta, dtype=np.float32), starts,
                              max_iter=GRID_STAGE_ITERATIONS, ftol=1e-7)
    theta, best = _polish(objective, coarse)
    grid_edge = [name for name, key, value in zip(NAMES, ("e", "a", "b", "alpha", "beta"), theta[[2, 0, 1, 3, 4]])
                 if _beyond(GRID[key], value)]
    if grid_edge:
        notes.append(f"{family}: fitted {', '.join(grid_edge)} beyond the edge of the start grid; no start was near "
                     "this optimum, so a better one may lie further out (check the fit)")
    draws = np.empty((0, 5))
    ci: dict[str, tuple[float, float] | None] = {k: None for k in NAMES}
    if counts is not None and len(counts):
        boot = huber_objective(log_n, log_d, log_l, delta, weights=counts)
        refit = minimize_batched(boot, np.repeat(theta[None], len(counts), axis=0))
        draws = _natural(refit.x)
        draws[~(refit.converged & np.isfinite(refit.f) & np.isfinite(draws).all(axis=1))] = np.nan
        failed = int(np.isnan(draws[:, 0]).sum())
        if failed:
            notes.append(f"{family}: {failed} of {len(counts)} parametric bootstrap refits did not converge "
                         "and were left out of the intervals")
        lo, hi = interval(draws)
        ci = {k: (float(lo[i]), float(hi[i])) if np.isfinite(lo[i]) else None for i, k in enumerate(NAMES)}
    law = ChinchillaLaw(*(float(v) for v in _natural(theta[None])[0]))
    return ParametricFit(law=law, objective=float(best), delta=delta, ci=ci, draws=draws,
                         grid_edge=grid_edge, notes=notes)


def _polish(objective, coarse) -> tuple[np.ndarray, float]:
    """Finish the best distinct candidates of the float32 grid stage in float64; keep the lowest."""
    order = np.argsort(np.where(np.isfinite(coarse.f), coarse.f, np.inf))
    candidates, seen = [], set()
    for i in order:
        key = tuple(np.round(coarse.x[i], 3))
        if key not in seen:
            seen.add(key)
            candidates.append(coarse.x[i])
        if len(candidates) == POLISHED:
            break
    fine = minimize_batched(objective, np.array(candidates))
    best = int(np.argmin(np.where(np.isfinite(fine.f), fine.f, np.inf)))
    return fine.x[best], float(fine.f[best])


def _beyond(axis: np.ndarray, value: float) -> bool:
    """More than one grid step outside the axis's span (or not finite)."""
    step = axis[1] - axis[0]
    return not axis.min() - step <= value <= axis.max() + step


def _natural(theta: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) rows -> (E, A, B, alpha, beta) rows."""
    a, b, e, alpha, beta = theta.T
    with np.errstate(over="ignore"):  # a run-away A or B (an unidentified law) becomes inf, then a failed draw
        return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)
