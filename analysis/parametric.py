"""Approach 3: the Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta (docs/method.md §6).

Minimise the *summed* Huber loss of LSE(a - alpha ln N, b - beta ln D, e) - ln L (E = e^e, A = e^a,
B = e^b) with L-BFGS from a grid of starts; bootstrap refits start from the full-data optimum.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from analysis.bootstrap import interval
from analysis.lbfgs import minimize_batched

NAMES = ("E", "A", "B", "alpha", "beta")
# start grid per parameter, in the optimiser's coordinates (a, b, e, alpha, beta)
GRID = {"a": np.arange(0, 26, 5.0), "b": np.arange(0, 26, 5.0), "e": np.arange(-1, 1.01, 0.5),
        "alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5)}
E_MIN = 1e-6  # lower bound of E as a fraction of the lowest loss: E = 0 in effect, with e = ln E finite
AT_BOUND = 1e-3  # E within this fraction of the lowest loss of 0 or of that loss counts as at its bound
ZERO_WIDTH = 1e-6  # a bootstrap interval narrower than this, relative to the value, has zero width
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
    degenerate: list[str] = field(default_factory=list)  # why the fit cannot be trusted; empty when it can
    fixed_e: float | None = None  # E held at this value (--floor) rather than fitted
    start: np.ndarray | None = None  # (a, b, e, alpha, beta) the winning float64 refinement started from

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

    def f_and_grad(theta: np.ndarray, rows: np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            f, grad, _, _ = huber_lse(theta.astype(dtype), rows, log_n, log_d, log_l, delta, weights)
        return f, grad.astype(np.float64)
    return f_and_grad


def huber_lse(theta: np.ndarray, rows: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
              delta: float, weights: np.ndarray | None = None):
    """The summed Huber loss of LSE(a - alpha ln N, b - beta ln D, e) - ln L per row of theta = (a, b, e, alpha,
    beta), its gradient, and each run's weights (w_N, w_D) of its N and D terms: d f / d ln N = -alpha w_N. ln N and
    ln D are one row of runs shared by every theta, or one row per theta (a law whose effective N or D depends on
    further parameters chains its gradient through w_N and w_D)."""
    cap = np.log(np.finfo(theta.dtype).max) - 10  # keeps exp finite; rows that far out are rejected by the line search
    a, b, e, alpha, beta = theta.T

    def term(coef, exponent, log_x):  # e^(coef - exponent ln x - e), overwritten in place
        x = np.multiply.outer(-exponent, log_x) if log_x.ndim == 1 else -exponent[:, None] * log_x
        x += (coef - e)[:, None]
        return np.exp(np.minimum(x, cap, out=x), out=x)

    # LSE relative to e: ln(e^e + e^t1 + e^t2) = e + ln(1 + e^(t1-e) + e^(t2-e))
    x1, x2 = term(a, alpha, log_n), term(b, beta, log_d)
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
    grad = np.stack([x1.sum(1), x2.sum(1), psi.sum(1), -_row_dot(x1, log_n), -_row_dot(x2, log_d)], axis=1)
    return r.sum(1, dtype=np.float64), grad, x1, x2


def _row_dot(x: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    return x @ log_x if log_x.ndim == 1 else np.einsum("ij,ij->i", x, log_x)


def fit_parametric(params, tokens, loss, *, delta: float = 1e-3, counts: np.ndarray | None = None,
                   starts: np.ndarray | None = None, family: str = "", fixed_e: float | None = None) -> ParametricFit:
    """Fit the law from the start grid; with `counts` (R, runs) refit each bootstrap resample.

    E is bounded to [0, lowest loss] (docs/method.md §6), or held at `fixed_e` (e.g. the corpus's entropy rate).
    """
    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    notes = _design_notes(log_n, log_d, log_l, family)
    lowest = float(np.min(loss))
    if fixed_e is not None and not 0 <= fixed_e <= lowest:
        raise ValueError(f"{family}: E fixed to {fixed_e:g}, outside [0, lowest loss {lowest:.4g}]")
    objective = huber_objective(log_n, log_d, log_l, delta)
    starts = start_grid() if starts is None else np.asarray(starts, dtype=float)
    bounds = e_bounds(log_l.min(), 1, fixed_e)  # one row, broadcast over the starts
    starts = np.unique(np.clip(starts, *bounds), axis=0)  # starts above the lowest loss land on the bound
    coarse = minimize_batched(huber_objective(log_n, log_d, log_l, delta, dtype=np.float32), starts, lower=bounds[0],
                              upper=bounds[1], max_iter=GRID_STAGE_ITERATIONS, ftol=1e-7)
    start, theta, best = polish(objective, best_distinct(coarse), bounds)
    grid_edge = outside_start_grid(theta, fixed_e)
    draws, ci = np.empty((0, 5)), {k: None for k in NAMES}
    if counts is not None and len(counts):
        draws, ci = _bootstrap(log_n, log_d, log_l, delta, counts, theta, fixed_e, family, notes)
    law = ChinchillaLaw(*(float(v) for v in _natural(theta[None])[0]))
    if fixed_e is not None:  # exactly the value asked for, not exp(ln E); E has no interval
        law = replace(law, E=float(fixed_e))
        draws[:, 0] = np.where(np.isnan(draws[:, 0]), np.nan, fixed_e)
        ci["E"] = None
    degenerate = degenerate_reasons(law, ci, grid_edge, lowest, fixed_e is not None)
    if degenerate:
        notes.append(f"{family}: degenerate Chinchilla fit ({'; '.join(degenerate)}); its frontier is not used "
                     "for a compute gap")
    return ParametricFit(law=law, objective=float(best), delta=delta, ci=ci, draws=draws, grid_edge=grid_edge,
                         notes=notes, degenerate=degenerate, fixed_e=fixed_e, start=start)


def outside_start_grid(theta: np.ndarray, fixed_e: float | None = None) -> list[str]:
    """The Chinchilla parameters of theta = (a, b, e, alpha, beta, ...) fitted more than one grid step outside the
    start grid: where the optimiser ran off, the runs do not pin them down."""
    return [name for name, key, value in zip(NAMES, ("e", "a", "b", "alpha", "beta"), theta[[2, 0, 1, 3, 4]])
            if _beyond(GRID[key], value) and not (key == "e" and fixed_e is not None)]


def e_bounds(log_l_min: float, rows: int, fixed_e: float | None = None,
             row_log_l_min: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) on theta = (a, b, e, alpha, beta), `rows` problems; only e is bounded.

    Every loss is E plus positive terms, so E lies in [0, lowest loss] (per row: `row_log_l_min`, a bootstrap
    resample's own lowest). e = ln E cannot reach E = 0: E_MIN·lowest loss stands for it (a term that small
    moves no fitted loss), the same value in every row so that fits stuck at 0 agree exactly.
    """
    lower = np.full((rows, 5), -np.inf)
    upper = np.full((rows, 5), np.inf)
    lower[:, 2] = log_l_min + np.log(E_MIN)
    upper[:, 2] = log_l_min if row_log_l_min is None else row_log_l_min
    if fixed_e is not None:
        lower[:, 2] = upper[:, 2] = np.maximum(np.log(max(fixed_e, 1e-300)), lower[:, 2])
    return lower, upper


def degenerate_reasons(law: ChinchillaLaw, ci: dict, grid_edge: list[str], lowest_loss: float,
                       e_fixed: bool = False) -> list[str]:
    """Why a fit cannot be trusted (empty when it can): E at a bound, a parameter outside the start grid, or
    a bootstrap interval of zero width (every refit stuck where it started)."""
    reasons = []
    if not e_fixed and law.E <= AT_BOUND * lowest_loss:
        reasons.append(f"E at its lower bound 0 (E = {law.E:.3g})")
    elif not e_fixed and law.E >= (1 - AT_BOUND) * lowest_loss:
        reasons.append(f"E at its upper bound, the lowest loss {lowest_loss:.4g} (E = {law.E:.4g})")
    reasons += [f"{name} outside the start grid" for name in grid_edge]
    for name in ("alpha", "beta") if e_fixed else ("E", "alpha", "beta"):
        lo_hi, value = ci.get(name), abs(getattr(law, name))
        if lo_hi is not None and lo_hi[1] - lo_hi[0] <= ZERO_WIDTH * max(value, 1e-300):
            reasons.append(f"zero-width bootstrap interval on {name} ({lo_hi[0]:.4g} to {lo_hi[1]:.4g})")
    return reasons


def _design_notes(log_n, log_d, log_l, family: str) -> list[str]:
    if len(log_l) < 5:
        raise ValueError(f"{family}: the parametric law has 5 parameters and needs >= 5 runs, got {len(log_l)}")
    if np.ptp(log_n + log_d) < np.log(1.2):
        return [f"{family}: all runs have about the same N·D (one FLOP budget), so A, B, alpha and beta "
                "are weakly determined"]
    return []


def _bootstrap(log_n, log_d, log_l, delta, counts, theta, fixed_e, family, notes):
    """Refit each resample from the full-data optimum; E is bounded by the lowest loss *in the resample*."""
    boot = huber_objective(log_n, log_d, log_l, delta, weights=counts)
    bounds = e_bounds(log_l.min(), len(counts), fixed_e, np.where(counts > 0, log_l, np.inf).min(axis=1))
    draws = refit_resamples(boot, theta, bounds, _natural)
    failed = int(np.isnan(draws[:, 0]).sum())
    if failed:
        notes.append(f"{family}: {failed} of {len(counts)} parametric bootstrap refits did not converge "
                     "and were left out of the intervals")
    lo, hi = interval(draws)
    return draws, {k: (float(lo[i]), float(hi[i])) if np.isfinite(lo[i]) else None for i, k in enumerate(NAMES)}


def refit_resamples(objective, theta: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], natural) -> np.ndarray:
    """Refit every resample (a row of the weighted `objective`) from the full-data optimum `theta`; the draws in
    natural units (`natural` maps optimiser rows to them), NaN rows where a refit failed."""
    rows = len(bounds[0])
    refit = minimize_batched(objective, np.repeat(theta[None], rows, axis=0), lower=bounds[0], upper=bounds[1])
    draws = natural(refit.x)
    draws[~(refit.converged & np.isfinite(refit.f) & np.isfinite(draws).all(axis=1))] = np.nan
    return draws


def best_distinct(coarse, count: int = POLISHED) -> np.ndarray:
    """The `count` best distinct points (to 3 decimals) of a grid stage's results, best first."""
    order = np.argsort(np.where(np.isfinite(coarse.f), coarse.f, np.inf))
    candidates, seen = [], set()
    for i in order:
        key = tuple(np.round(coarse.x[i], 3))
        if key not in seen:
            seen.add(key)
            candidates.append(coarse.x[i])
        if len(candidates) == count:
            break
    return np.array(candidates)


def polish(objective, candidates: np.ndarray, bounds) -> tuple[np.ndarray, np.ndarray, float]:
    """Finish the candidates in float64; keep the lowest. Returns (the candidate it started from, the optimum,
    the objective there)."""
    fine = minimize_batched(objective, candidates, lower=bounds[0], upper=bounds[1])
    best = int(np.argmin(np.where(np.isfinite(fine.f), fine.f, np.inf)))
    return np.array(candidates[best]), fine.x[best], float(fine.f[best])


def _beyond(axis: np.ndarray, value: float) -> bool:
    """More than one grid step outside the axis's span (or not finite)."""
    step = axis[1] - axis[0]
    return not axis.min() - step <= value <= axis.max() + step


def _natural(theta: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) rows -> (E, A, B, alpha, beta) rows."""
    a, b, e, alpha, beta = theta.T
    with np.errstate(over="ignore"):  # a run-away A or B (an unidentified law) becomes inf, then a failed draw
        return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)
