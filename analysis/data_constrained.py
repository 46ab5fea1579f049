"""The data-constrained law of Muennighoff et al. (2023) and its fit (docs/method.md §6, "Data-constrained scaling").

    L(N, D, U) = E + A/N'^alpha + B/D'^beta
    D' = U + U·R*_D·(1 - exp(-R_D/R*_D)),  R_D = max(D/U - 1, 0)             repeated tokens lose value
    N' = U_N + U_N·R*_N·(1 - exp(-R_N/R*_N)),  U_N = min(N, N*(U)), R_N = max(N/U_N - 1, 0)   (optional)

U is the unique tokens a run trained on, D its tokens in all, N*(U) the compute-optimal size for U fresh tokens
under the same law. Without R*_N, N' = N. Fitted as Approach 3 is (analysis/parametric.py, whose pieces it
reuses): the summed Huber loss of LSE(a - alpha ln N', b - beta ln D', e) - ln L, R* = e^r fitted in logs, L-BFGS
from a start grid, bootstrap refits from the optimum.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from analysis.bootstrap import interval
from analysis.lbfgs import minimize_batched
from analysis.parametric import (GRID_STAGE_ITERATIONS, ChinchillaLaw, best_distinct, degenerate_reasons, e_bounds,
                                 huber_lse, outside_start_grid, polish, refit_resamples, start_grid)

NAMES = ("E", "A", "B", "alpha", "beta", "rd_star", "rn_star")
R_STAR_BOUNDS = (1e-2, 1e4)  # half-lives in epochs: beyond 1e4 no study of ~100 epochs can tell them apart
R_STAR_STARTS = (2.0, 16.0, 128.0, 1024.0)  # R*_D tried from each of the grid stage's best points
RN_STAR_STARTS = (1.0, 5.0, 25.0)
EXPONENT_MIN = 1e-2  # with R*_N, N*(U) divides by alpha and takes ln beta
AT_BOUND = 1e-2  # a half-life within this fraction (in logs, of the bounds' span) of a bound sits at it


@dataclass(frozen=True)
class DataConstrainedLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    rd_star: float  # R*_D, epochs: the repetition half-life of data
    rn_star: float | None = None  # R*_N; None: excess parameters are not discounted (N' = N)

    @property
    def fresh(self) -> ChinchillaLaw:
        """The law on data seen once: Chinchilla's."""
        return ChinchillaLaw(self.E, self.A, self.B, self.alpha, self.beta)

    def effective_data(self, tokens, unique) -> np.ndarray:
        """D'; a run that trained on fewer tokens than U saw D unique ones."""
        log_d = np.log(tokens)
        return np.exp(_decayed(np.minimum(np.log(unique), log_d), log_d, np.log(self.rd_star))[0])

    def optimal_params(self, unique) -> np.ndarray:
        """N*(U): the compute-optimal size (C = 6ND) for U fresh tokens."""
        return np.exp(_log_optimal_params(np.log(self.A), np.log(self.B), self.alpha, self.beta, np.log(unique)))

    def effective_params(self, params, unique) -> np.ndarray:
        params = np.asarray(params, dtype=float)
        if self.rn_star is None:
            return params
        base = np.minimum(np.log(params), np.log(self.optimal_params(unique)))
        return np.exp(_decayed(base, np.log(params), np.log(self.rn_star))[0])

    def loss(self, params, tokens, unique) -> np.ndarray:
        unique = np.minimum(unique, tokens)  # the unique tokens a run saw
        n, d = self.effective_params(params, unique), self.effective_data(tokens, unique)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimal_loss(self, compute, unique, decades: float = 3.0, steps: int = 241) -> np.ndarray:
        """The lowest loss at each compute C = 6ND over sizes N within `decades` of sqrt(C/6), with U unique
        tokens: what a family reaches at that compute when its data is capped at U."""
        compute = np.asarray(compute, dtype=float)[:, None]
        n = np.sqrt(compute / 6) * np.logspace(-decades, decades, steps)
        return self.loss(n, compute / (6 * n), unique).min(axis=1)


@dataclass(frozen=True)
class DataConstrainedFit:
    law: DataConstrainedLaw
    objective: float
    delta: float
    ci: dict[str, tuple[float, float] | None]
    draws: np.ndarray  # (R, 6 or 7) bootstrap draws in NAMES order; NaN rows failed
    n_points: int
    degenerate: list[str]  # why the fit cannot be trusted; empty when it can
    notes: list[str]
    fixed_e: float | None = None  # E held at this value (--floor) rather than fitted

    def draw_laws(self) -> list[DataConstrainedLaw | None]:
        """One law per bootstrap draw; None where the refit failed."""
        return [None if np.isnan(row).any() else DataConstrainedLaw(*map(float, row)) for row in self.draws]


def fit_data_constrained(params, tokens, unique, loss, *, delta: float = 1e-3, counts: np.ndarray | None = None,
                         family: str = "", fixed_e: float | None = None, fit_rn: bool = False) -> DataConstrainedFit:
    """Fit the law; with `counts` (R, runs) refit each bootstrap resample. `unique` is each run's unique tokens
    (at least its tokens for a run on fresh data). E is bounded to [0, lowest loss], or held at `fixed_e`."""
    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    log_u = np.minimum(np.log(unique), log_d)  # more unique tokens than trained on: fresh data, R_D = 0
    width = 7 if fit_rn else 6
    if len(log_l) <= width:
        raise ValueError(f"{family}: the data-constrained law has {width} parameters and needs more runs, got "
                         f"{len(log_l)}")
    lowest = float(np.min(loss))
    if fixed_e is not None and not 0 <= fixed_e <= lowest:
        raise ValueError(f"{family}: E fixed to {fixed_e:g}, outside [0, lowest loss {lowest:.4g}]")
    bounds = _bounds(e_bounds(log_l.min(), 1, fixed_e), fit_rn)
    rows = [log_n, log_d, log_u, log_l]
    starts = np.unique(np.clip(_grid_starts(fit_rn), *bounds), axis=0)
    coarse = minimize_batched(objective(*rows, delta, fit_rn, dtype=np.float32), starts, lower=bounds[0],
                              upper=bounds[1], max_iter=GRID_STAGE_ITERATIONS, ftol=1e-7)
    finish = np.unique(np.clip(_with_half_lives(best_distinct(coarse), fit_rn), *bounds), axis=0)
    _, theta, best = polish(objective(*rows, delta, fit_rn), finish, bounds)
    draws, ci = np.empty((0, width)), {k: None for k in NAMES[:width]}
    if counts is not None and len(counts):
        boot = objective(*rows, delta, fit_rn, weights=counts)
        boot_bounds = _bounds(e_bounds(log_l.min(), len(counts), fixed_e,
                                       np.where(counts > 0, log_l, np.inf).min(axis=1)), fit_rn)
        draws = refit_resamples(boot, theta, boot_bounds, natural)
        lo, hi = interval(draws)
        ci = {k: (float(lo[i]), float(hi[i])) if np.isfinite(lo[i]) else None for i, k in enumerate(NAMES[:width])}
    law = DataConstrainedLaw(*(float(v) for v in natural(theta[None])[0]))
    if fixed_e is not None:  # exactly the value asked for; E has no interval
        law = replace(law, E=float(fixed_e))
        draws[:, 0] = np.where(np.isnan(draws[:, 0]), np.nan, fixed_e)
        ci["E"] = None
    notes = _failed_note(draws, family)
    degenerate = (degenerate_reasons(law.fresh, ci, outside_start_grid(theta, fixed_e), lowest, fixed_e is not None)
                  + _half_life_reasons(law, ci))
    if degenerate:
        notes.append(f"{family}: degenerate data-constrained fit ({'; '.join(degenerate)})")
    return DataConstrainedFit(law, float(best), delta, ci, draws, len(log_l), degenerate, notes, fixed_e)


def objective(log_n, log_d, log_u, log_l, delta: float, fit_rn: bool, weights=None, dtype=np.float64):
    """f(theta[rows], rows) -> (summed Huber loss, gradient) for rows of theta = (a, b, e, alpha, beta, ln R*_D
    [, ln R*_N]): parametric.huber_lse on ln N' and ln D', its gradient chained through them."""
    log_n, log_d, log_u, log_l = (np.asarray(v, dtype=dtype) for v in (log_n, log_d, log_u, log_l))
    weights = None if weights is None else np.asarray(weights, dtype=dtype)

    def f_and_grad(theta: np.ndarray, rows: np.ndarray):
        theta = theta.astype(dtype)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            log_dd, dd_star, _ = _decayed(log_u, log_d, theta[:, 5:6])
            log_nn, chain = _effective_log_params(theta, log_n, log_u) if fit_rn else (log_n, None)
            f, grad, w_n, w_d = huber_lse(theta[:, :5], rows, log_nn, log_dd, log_l, delta, weights)
            alpha, beta = theta[:, 3], theta[:, 4]
            extra = [-beta * np.einsum("ij,ij->i", w_d, dd_star)]
            if chain is not None:
                dn_base, dn_star, log_base = chain
                g = -alpha[:, None] * w_n * dn_base  # d f / d ln N*(U), run by run
                grad[:, 0] += g.sum(1) / alpha
                grad[:, 1] -= g.sum(1) / alpha
                grad[:, 3] += np.einsum("ij,ij->i", g, 1 / alpha[:, None] - log_base) / alpha
                grad[:, 4] += np.einsum("ij,ij->i", g, log_u - 1 / beta[:, None]) / alpha
                extra.append(-alpha * np.einsum("ij,ij->i", w_n, dn_star))
        return f, np.column_stack([grad, *extra]).astype(np.float64)
    return f_and_grad


def natural(theta: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta, r_D[, r_N]) rows -> (E, A, B, alpha, beta, R*_D[, R*_N]) rows."""
    out = np.array(theta, dtype=float)
    with np.errstate(over="ignore"):  # a run-away A or B (an unidentified law) becomes inf, then a failed draw
        out[:, 0], out[:, 1], out[:, 2] = np.exp(theta[:, 2]), np.exp(theta[:, 0]), np.exp(theta[:, 1])
        out[:, 5:] = np.exp(theta[:, 5:])
    return out


def _decayed(log_base, log_x, log_star):
    """ln X' of X' = U + U·R*(1 - exp(-R/R*)), R = max(X/U - 1, 0), U = e^log_base, R* = e^log_star; with
    d ln X'/d ln R* and d ln X'/dR."""
    excess = np.maximum(np.expm1(log_x - log_base), 0)
    star = np.exp(log_star)
    x = excess / star
    kept = -np.expm1(-x)  # 1 - e^-x, exact for small x
    scale = 1 + star * kept
    return log_base + np.log(scale), star * (kept - x * np.exp(-x)) / scale, np.exp(-x) / scale


def _log_optimal_params(log_a, log_b, alpha, beta, log_u):
    """ln N*(U) = (beta ln U + ln(alpha A) - ln(beta B)) / alpha: Chinchilla's allocation solved for the size
    whose compute-optimal data is U (Muennighoff et al. 2023)."""
    return (beta * log_u + log_a - log_b + np.log(alpha) - np.log(beta)) / alpha


def _effective_log_params(theta, log_n, log_u):
    """ln N' per row of theta and run, and what the gradient needs: d ln N'/d ln N*(U), d ln N'/d ln R*_N and
    ln N*(U)."""
    a, b, _, alpha, beta, _, log_star = theta.T
    log_opt = _log_optimal_params(a[:, None], b[:, None], alpha[:, None], beta[:, None], log_u)
    over = log_n > log_opt  # more parameters than U tokens can use
    log_base = np.where(over, log_opt, log_n)
    log_eff, d_star, d_excess = _decayed(log_base, log_n, log_star[:, None])
    d_base = np.where(over, 1 - np.exp(log_n - log_base) * d_excess, 0.0)
    return log_eff, (d_base, np.where(over, d_star, 0.0), log_opt)


def _bounds(chinchilla: tuple[np.ndarray, np.ndarray], fit_rn: bool) -> tuple[np.ndarray, np.ndarray]:
    """parametric.e_bounds' rows widened by ln R* within R_STAR_BOUNDS; with R*_N, alpha and beta kept positive."""
    lower, upper = chinchilla
    extra = 2 if fit_rn else 1
    log_r = np.log(R_STAR_BOUNDS)
    lower = np.hstack([lower, np.full((len(lower), extra), log_r[0])])
    upper = np.hstack([upper, np.full((len(upper), extra), log_r[1])])
    if fit_rn:
        lower[:, 3:5] = EXPONENT_MIN
    return lower, upper


def _grid_starts(fit_rn: bool) -> np.ndarray:
    """parametric's start grid, each start with the middle half-lives: the grid stage finds the basins of the
    other parameters; the half-lives are searched when its best points are finished."""
    grid = start_grid()
    middle = [np.log(R_STAR_STARTS[1])] + ([np.log(RN_STAR_STARTS[1])] if fit_rn else [])
    return np.hstack([grid, np.tile(middle, (len(grid), 1))])


def _with_half_lives(candidates: np.ndarray, fit_rn: bool) -> np.ndarray:
    """Each candidate as it is and with every combination of the starting half-lives."""
    options = [np.log(R_STAR_STARTS)] + ([np.log(RN_STAR_STARTS)] if fit_rn else [])
    out = [candidates]
    for values in itertools.product(*options):
        varied = candidates.copy()
        varied[:, 5:] = values
        out.append(varied)
    return np.vstack(out)


def bound_side(value: float) -> str | None:
    """'upper' or 'lower' where a half-life sits at a bound of R_STAR_BOUNDS (within AT_BOUND of their span in
    logs), else None: there the runs cannot tell it from 'as good as new' or 'repeats worth nothing'."""
    span = np.log(R_STAR_BOUNDS[1] / R_STAR_BOUNDS[0])
    if np.log(R_STAR_BOUNDS[1] / value) <= AT_BOUND * span:
        return "upper"
    return "lower" if np.log(value / R_STAR_BOUNDS[0]) <= AT_BOUND * span else None


def _half_life_reasons(law: DataConstrainedLaw, ci: dict) -> list[str]:
    """A half-life at a bound, or with a zero-width interval."""
    reasons = []
    meaning = {"upper": "no measurable cost of repetition", "lower": "repeats worth nothing"}
    for name, label in (("rd_star", "R*_D"), ("rn_star", "R*_N")):
        value = getattr(law, name)
        if value is None:
            continue
        side = bound_side(value)
        if side:
            reasons.append(f"{label} at its {side} bound {R_STAR_BOUNDS[side == 'upper']:g} ({meaning[side]})")
        lo_hi = ci.get(name)
        if lo_hi is not None and lo_hi[1] - lo_hi[0] <= 1e-6 * value:
            reasons.append(f"zero-width bootstrap interval on {label}")
    return reasons


def _failed_note(draws: np.ndarray, family: str) -> list[str]:
    failed = int(np.isnan(draws[:, 0]).sum()) if len(draws) else 0
    return [f"{family}: {failed} of {len(draws)} data-constrained bootstrap refits did not converge and were left "
            "out of the intervals"] if failed else []
