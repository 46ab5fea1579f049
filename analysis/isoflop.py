"""Approach 2: a parabola of loss in log N per FLOP budget, then power laws of the optima in C.

The fit and its bootstrap resamples are rows of one loss matrix (row 0: the data) solved at once.

A point is one model size of a curve: the mean loss over its seeds, with a comparison error loss_se
(analysis/runs.py). A curve with >= 2 seeds at every size is weighted by sqrt(seeds): one pair of seeds is too
few to weigh a point by its own spread, and a pair that agrees by chance would pin the parabola. Any other
curve whose every point has a positive finite loss_se is fitted by weighted least squares (weights 1/loss_se);
otherwise unweighted, since a missing or zero error (a single-seed ARM is exact given its sequences) says
nothing of the training noise between sizes. Bootstrap: pooled parabola residuals (_resample_losses).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from scipy.special import ndtri, stdtrit

from analysis.bootstrap import LEVEL, interval

MIN_SIZES = 3  # distinct model sizes a budget needs for a parabola
WIDEST_SPAN = 64.0  # largest / smallest size beyond which a parabola in ln N misplaces the optimum


@dataclass(frozen=True)
class PowerLaw:
    """y = coef · x^exponent, with percentile intervals (None without a bootstrap)."""
    coef: float
    exponent: float
    coef_ci: tuple[float, float] | None = None
    exponent_ci: tuple[float, float] | None = None
    n_points: int = 0

    def __call__(self, x):
        return self.coef * np.asarray(x, dtype=float) ** self.exponent


@dataclass(frozen=True)
class BucketOptimum:
    """One IsoFLOP curve: its runs, its parabola (loss = q0 + q1·lnN + q2·lnN²) and optimum."""
    budget: float
    n_runs: int
    n_sizes: int
    n_range: tuple[float, float]
    edge: bool
    note: str | None = None
    parabola: tuple[float, float, float] | None = None
    n_opt: float | None = None
    d_opt: float | None = None
    l_opt: float | None = None
    n_opt_ci: tuple[float, float] | None = None
    d_opt_ci: tuple[float, float] | None = None
    l_opt_ci: tuple[float, float] | None = None
    tokens_per_param_ci: tuple[float, float] | None = None  # D*/N*
    edge_side: str | None = None  # "smaller" or "larger": where an edge curve's optimum lies, for the next grid
    lowest: tuple[float, float, float] | None = None  # (N, D, loss) of the lowest measured point
    resamples_at_end: int = 0  # resamples whose optimum over the sampled sizes is at an end, not a vertex

    @property
    def tokens_per_param(self) -> float | None:
        return None if self.n_opt is None else self.d_opt / self.n_opt

    @property
    def usable(self) -> bool:
        return self.n_opt is not None and not self.edge


@dataclass(frozen=True)
class IsoflopFit:
    applicable: bool
    buckets: list[BucketOptimum]
    notes: list[str]
    n_opt_law: PowerLaw | None = None
    d_opt_law: PowerLaw | None = None
    l_opt_law: PowerLaw | None = None
    # bootstrap draws of (log coef, exponent) per law, shape (R, 2); NaN rows are failed resamples
    draws: dict[str, np.ndarray] = field(default_factory=dict)
    failed_resamples: int = 0


def bucket_budgets(budgets: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Label runs whose budgets lie within `tolerance` (relative) of a bucket's smallest budget.

    Returns (label per run, bucket budget = geometric mean of its runs' budgets), buckets in ascending C.
    """
    budgets = np.asarray(budgets, dtype=float)
    labels = np.empty(len(budgets), dtype=int)
    label, start = -1, None
    for i in np.argsort(budgets, kind="stable"):
        if start is None or budgets[i] >= start * (1 + tolerance):
            label, start = label + 1, budgets[i]
        labels[i] = label
    members = [budgets[labels == k] for k in range(label + 1)]
    centres = np.array([m[0] if np.all(m == m[0]) else np.exp(np.log(m).mean()) for m in members])
    return labels, centres


def fit_power_law(x, y) -> PowerLaw:
    """Least squares of log y on log x (no interval): for optima that come without their runs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    log_coef, exponent = _loglog(np.log(x), np.log(y)[None], np.ones((1, len(x)), dtype=bool))
    return PowerLaw(float(np.exp(log_coef[0])), float(exponent[0]), n_points=len(x))


class CurveFit(NamedTuple):
    """One IsoFLOP curve fitted on every row of the loss matrix (row 0: the data, rows 1..R: resamples)."""
    bucket: BucketOptimum
    optima: np.ndarray  # (3, R+1): ln N*, ln D*, L* per row; NaN without a parabola
    interior: np.ndarray  # (R+1,) bool: the row's minimum lies within the sampled sizes


def fit_isoflop(params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, labels: np.ndarray,
                budgets: np.ndarray, n_resamples: int = 0, rng: np.random.Generator | None = None,
                family: str = "", loss_se: np.ndarray | None = None,
                seed_losses: np.ndarray | None = None) -> IsoflopFit:
    """Parabola per bucket and power laws N*(C), D*(C), L*(C), with bootstrap intervals when n_resamples > 0.

    One entry per point: `loss` its mean over seeds, `loss_se` its comparison error (None: unweighted, no
    note), `seed_losses` (points, seeds) its seeds' losses, NaN-padded (None: one run per point).
    """
    x, log_d, loss = np.log(params), np.log(tokens), np.asarray(loss, dtype=float)
    curves = [np.flatnonzero(labels == k) for k in range(len(budgets))]
    curved = [len(np.unique(params[idx])) >= MIN_SIZES for idx in curves]
    seeds = np.ones(len(loss), dtype=int) if seed_losses is None else np.isfinite(seed_losses).sum(axis=1)
    replicated = [ok and seeds[idx].min() >= 2 for idx, ok in zip(curves, curved)]
    weights = [np.sqrt(seeds[idx]) if rep else None if loss_se is None else _weights(loss_se[idx])
               for idx, rep in zip(curves, replicated)]
    notes: list[str] = []
    if not any(curved):
        per_budget = ", ".join(f"C={c:.3g}: {len(np.unique(params[idx]))}" for c, idx in zip(budgets, curves))
        notes.append(f"{family}: Approach 2 not applicable: no budget has >= {MIN_SIZES} model sizes "
                     f"(sizes per budget: {per_budget})")
    elif loss_se is not None:
        others = [w is not None for w, ok, rep in zip(weights, curved, replicated) if ok and not rep]
        notes.append(_weighting_note(others, family, sum(replicated)))
    samples = _resample_losses(x, loss, curves, curved, weights, n_resamples, rng or np.random.default_rng(0),
                               notes, family, replicated, seed_losses)
    fits = [fit_curve(c, params[idx], log_d[idx], samples[:, idx], family, notes, w, int(seeds[idx].sum()))
            for c, idx, w in zip(budgets, curves, weights)]
    buckets = [f.bucket for f in fits]
    if not any(curved):
        return IsoflopFit(applicable=False, buckets=buckets, notes=notes)
    usable = np.array([b.usable for b in buckets])
    if usable.sum() < 2:
        notes.append(f"{family}: power laws need interior optima at >= 2 budgets, have {usable.sum()}; "
                     "N*(C), D*(C), L*(C) not fitted")
        return IsoflopFit(applicable=True, buckets=buckets, notes=notes)
    optima = np.stack([f.optima for f in fits], axis=-1)  # (3, R+1, buckets)
    # A resample drops a curve whose optimum moved to the edge from N*(C) and D*(C): N* is not located there.
    # L*(C) keeps it, with the lowest loss its parabola reaches over the sampled sizes: that loss is still
    # measured, and dropping the budget would make the frontier, hence the gap, jump between resamples.
    mask = np.stack([f.interior for f in fits], axis=-1) & usable[None, :]
    laws, draws = fit_optima_laws(budgets, optima, mask, loss_mask=np.broadcast_to(usable[None, :], mask.shape))
    failed = int(np.isnan(draws["n_opt"][:, 1]).sum()) if draws else 0
    if failed:
        notes.append(f"{family}: {failed} of {len(samples) - 1} bootstrap resamples had < 2 interior optima "
                     "and were left out of the intervals")
    return IsoflopFit(applicable=True, buckets=buckets, notes=notes, n_opt_law=laws["n_opt"],
                      d_opt_law=laws["d_opt"], l_opt_law=laws["l_opt"], draws=draws, failed_resamples=failed)


def fit_curve(budget: float, params: np.ndarray, log_d: np.ndarray, samples: np.ndarray, family: str = "",
              notes: list[str] | None = None, weights: np.ndarray | None = None,
              n_runs: int | None = None) -> CurveFit:
    """The parabola and optimum of one budget's points; `samples` (R+1, points) holds the losses, row 0 the data.

    `weights` (1/loss_se per point) make it weighted least squares; `n_runs` counts the runs behind the
    points (default: one each). Problems (too wide a grid, an edge optimum) are appended to `notes`.
    """
    notes = [] if notes is None else notes
    sizes = np.unique(params)
    base = dict(budget=float(budget), n_runs=len(params) if n_runs is None else n_runs, n_sizes=len(sizes),
                n_range=(float(sizes.min()), float(sizes.max())))
    rows = len(samples)
    if len(sizes) < MIN_SIZES:
        bucket = BucketOptimum(**base, edge=False, note=f"{len(sizes)} size(s): no parabola")
        return CurveFit(bucket, np.full((3, rows), np.nan), np.zeros(rows, dtype=bool))
    if sizes.max() / sizes.min() > WIDEST_SPAN:
        notes.append(f"{family}: C={budget:.3g} samples sizes over a {sizes.max() / sizes.min():.0f}x range; "
                     "grids wider than about ±8x around N* bias the parabola's optimum (docs/method.md §6)")
    fit = _parabolas(np.log(params), log_d, samples, weights)
    xs, ls, lds = fit.log_n, fit.loss, fit.log_d
    lowest = int(np.argmin(samples[0]))
    base.update(lowest=(float(params[lowest]), float(np.exp(log_d[lowest])), float(samples[0, lowest])),
                parabola=tuple(float(v) for v in fit.q), resamples_at_end=int((~fit.interior[1:]).sum()))
    # Each resample's optimum over the sampled sizes: its vertex, or the end where its parabola is lowest. Keeping
    # only the resamples whose vertex lies inside would cut the distribution at the edge and could leave the
    # estimate outside its own interval; counting the vertices far outside would stretch it to sizes never run.
    ci = [_ci(v[1:]) if rows > 1 else None
          for v in (fit.log_n_low, fit.log_d_low, ls, fit.log_d_low - fit.log_n_low)]
    side, reason = _edge(fit.q, xs[0], sizes, params[lowest])
    outside = [name for name, c, e in zip(("N*", "D*", "L*", "D*/N*"), ci, (xs[0], lds[0], ls[0], lds[0] - xs[0]))
               if c is not None and not c[0] <= e <= c[1]]
    if reason is None and outside:
        reason = f"unstable: the fit's {', '.join(outside)} lies outside its bootstrap interval"
    if reason is not None:
        notes.append(f"{family}: C={budget:.3g} optimum at the edge ({reason}); excluded from the power-law fits")
        return CurveFit(BucketOptimum(**base, edge=True, note=reason, edge_side=side), np.stack([xs, lds, ls]),
                        fit.interior)
    bucket = BucketOptimum(
        **base, edge=False, n_opt=float(np.exp(xs[0])), d_opt=float(np.exp(lds[0])), l_opt=float(ls[0]),
        n_opt_ci=_exp(ci[0]), d_opt_ci=_exp(ci[1]), l_opt_ci=ci[2], tokens_per_param_ci=_exp(ci[3]))
    return CurveFit(bucket, np.stack([xs, lds, ls]), fit.interior)


def fit_optima_laws(budgets: np.ndarray, optima: np.ndarray, mask: np.ndarray, loss_mask: np.ndarray | None = None
                    ) -> tuple[dict[str, PowerLaw], dict[str, np.ndarray]]:
    """Power laws N*(C), D*(C), L*(C) through the optima (3, R+1, buckets) of each row, over its `mask`ed buckets
    (`loss_mask`, default `mask`, for L*).

    Row 0 gives the laws and rows 1..R their intervals and (ln coef, exponent) draws (none when R = 0).
    """
    log_c = np.log(budgets)
    boot = optima.shape[1] > 1
    laws, draws = {}, {}
    loss_mask = mask if loss_mask is None else loss_mask
    log_l = np.log(np.where(loss_mask, optima[2], 1.0))  # L* comes unlogged; masked-out entries may be NaN
    for name, values, used in (("n_opt", optima[0], mask), ("d_opt", optima[1], mask), ("l_opt", log_l, loss_mask)):
        log_coef, exponent = _loglog(log_c, np.where(used, values, 0.0), used)
        coef_ci = exponent_ci = None
        if boot:
            draws[name] = np.stack([log_coef[1:], exponent[1:]], axis=1)
            coef_ci = _exp(_holding(log_coef[0], _ci(log_coef[1:])))
            exponent_ci = _holding(exponent[0], _ci(exponent[1:]))
        laws[name] = PowerLaw(float(np.exp(log_coef[0])), float(exponent[0]), coef_ci, exponent_ci,
                              n_points=int(used[0].sum()))
    return laws, draws


def _resample_losses(x, loss, curves, curved, weights, n_resamples, rng, notes, family, replicated,
                     seed_losses) -> np.ndarray:
    """Row 0: the losses; rows 1..R: resampled losses, from the parabolas' pooled residuals, also where seeds exist:
    a point mean departs from its parabola by its seeds' noise and by what its shape does that a parabola does not
    (docs/method.md §6), and only residuals see both. Where they leave no dof, replicated curves use their seeds."""
    if n_resamples <= 0 or not any(curved):
        return loss[None]
    samples = np.repeat(loss[None], n_resamples + 1, axis=0)
    drawn = _residual_draws(x, loss, [c for c, ok in zip(curves, curved) if ok],
                            [w for w, ok in zip(weights, curved) if ok], n_resamples, rng)
    if drawn is not None:
        samples[1:, drawn[0]] = drawn[1]
        return samples
    if not all(rep for rep, ok in zip(replicated, curved) if ok):
        notes.append(f"{family}: every IsoFLOP curve has exactly 3 sizes, so the parabolas leave no residuals to "
                     "resample, and not every curve has replicate seeds: Approach 2 has no intervals")
        return loss[None]
    in_curve = np.concatenate([idx for idx, rep in zip(curves, replicated) if rep])
    samples[1:, in_curve] = _seed_means(seed_losses[in_curve], n_resamples, rng)
    return samples


def _residual_draws(x, loss, curves, weights, n_resamples, rng) -> tuple[np.ndarray, np.ndarray] | None:
    """(points, (R, points) losses): each parabola's fitted values plus residuals drawn from the pool; None
    when the parabolas leave no residual degrees of freedom.

    The model sizes of an IsoFLOP curve are a design, not a sample: drawing runs with replacement would
    leave a 5-9 point curve with 3-5 distinct sizes and inflate the intervals (coverage ~0.99 for a
    nominal 0.95 on synthetic data). Residuals are pooled over the curves, rescaled for the 3 parameters each
    parabola spends, and widened by t/z (_t_widening).
    """
    fitted = loss.copy()
    residuals, dof = [], 0
    for idx, w in zip(curves, weights):
        xc = x[idx] - x[idx].mean()
        fitted[idx] = np.polyval(np.polyfit(xc, loss[idx], 2, w=w), xc)  # the parabola the data row gets
        residuals.append(loss[idx] - fitted[idx])
        dof += len(idx) - 3
    if dof == 0:
        return None
    pool = np.concatenate(residuals) * np.sqrt(sum(map(len, residuals)) / dof) * _t_widening(dof)
    in_curve = np.concatenate(curves)
    return in_curve, fitted[in_curve] + pool[rng.integers(0, len(pool), size=(n_resamples, len(in_curve)))]


def _t_widening(dof: int, level: float = LEVEL) -> float:
    """t over normal quantile at the interval's level. The residuals' spread is estimated from `dof` degrees of
    freedom, and a bootstrap that takes it as known gives a linear estimate a z-interval where a t-interval is due:
    with three 5-size curves (dof 6) a nominal 95% covers 90% in theory, and the demo-sized ARM's N* exponent band
    held the truth in 91-94% of simulated studies, 96% widened (benchmarks/band_coverage.py)."""
    tail = 0.5 + level / 2
    return float(stdtrit(dof, tail) / ndtri(tail))


def _seed_means(seed_losses: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(R, points): each point's mean plus the mean of k deviations drawn from the pool of every point's seed
    deviations from its mean, each rescaled by sqrt(k/(k-1)) and widened by t/z for the pool's dof.

    Only where the parabolas leave no residuals (3 sizes per curve). A case bootstrap of each point's own k seeds
    would draw means with (k-1)/k of their variance (half with two seeds). `seed_losses` (points, most seeds) is
    NaN-padded on the right; draws past a point's k are masked out.
    """
    k = np.isfinite(seed_losses).sum(axis=1)
    means = np.nanmean(seed_losses, axis=1)
    deviations = (seed_losses - means[:, None]) * np.sqrt(k / (k - 1))[:, None]
    pool = deviations[np.isfinite(deviations)] * _t_widening(int((k - 1).sum()))
    width = seed_losses.shape[1]
    draws = pool[rng.integers(0, len(pool), size=(n_resamples, len(k), width))]
    return means + np.where(np.arange(width) < k[:, None], draws, 0.0).sum(axis=2) / k


def _weights(se: np.ndarray) -> np.ndarray | None:
    """1/se when every point has a positive finite error, else None (unweighted)."""
    return 1.0 / se if np.all(np.isfinite(se) & (se > 0)) else None


def _weighting_note(weighted: list[bool], family: str, replicated: int = 0) -> str:
    """What weighs the parabolas: `weighted` per unreplicated curve, and the number of replicated curves."""
    done, total = sum(weighted), len(weighted)
    if replicated:
        rest = f"; {done} of the other {total} by 1/loss_se" if total else ""
        return f"{family}: {replicated} IsoFLOP parabolas with replicate seeds weighted by sqrt(seeds){rest}"
    if done == 0:
        return (f"{family}: IsoFLOP parabolas fitted unweighted: no curve has a positive comparison error "
                "(replicate seeds or val_mc_stderr) at every size")
    rest = "" if done == total else "; the others lack a positive error at some size and are fitted unweighted"
    return f"{family}: {done} of {total} IsoFLOP parabolas weighted by 1/loss_se{rest}"


class Parabolas(NamedTuple):
    """Quadratic fits of loss on ln N, one per row of a loss matrix (row 0: the data)."""
    q: tuple[float, float, float]  # row 0's parabola, loss = q0 + q1·lnN + q2·lnN²
    log_n: np.ndarray  # per row, ln N* at the vertex (NaN or meaningless without a minimum)
    loss: np.ndarray  # L*: the vertex's loss where interior, else the parabola's lowest over the sampled sizes
    log_d: np.ndarray  # ln D* at the vertex
    interior: np.ndarray  # positive curvature and the vertex within the sampled sizes
    log_n_low: np.ndarray  # where the parabola is lowest over the sampled sizes: the vertex, or an end
    log_d_low: np.ndarray  # ln D there


def _parabolas(x, log_d, losses, weights=None) -> Parabolas:
    """Fit every row of `losses` (R, m) over sizes x = ln N, weighted by `weights` (m,) when given."""
    centre = x.mean()
    xc = x - centre
    c = np.polynomial.polynomial.polyfit(xc, losses.T, 2, w=weights).T  # (R, 3): constant, linear, quadratic
    with np.errstate(divide="ignore", invalid="ignore"):
        xs_c = -c[:, 1] / (2 * c[:, 2])
        ls = c[:, 0] - c[:, 1] ** 2 / (4 * c[:, 2])
    ok = (c[:, 2] > 0) & (xs_c >= xc.min()) & (xs_c <= xc.max())
    ends = [c[:, 0] + c[:, 1] * e + c[:, 2] * e * e for e in (xc.min(), xc.max())]
    low = np.where(ok, xs_c, np.where(ends[0] <= ends[1], xc.min(), xc.max()))
    # ln D is linear in ln N along an IsoFLOP curve (slope -1 under C = 6ND): read D* off that line
    slope, intercept = np.polyfit(xc, log_d, 1)
    c0, c1, c2 = c[0]
    q = (c0 - c1 * centre + c2 * centre ** 2, c1 - 2 * c2 * centre, c2)
    return Parabolas(q, xs_c + centre, np.where(ok, ls, np.minimum(*ends)), intercept + slope * xs_c, ok,
                     low + centre, intercept + slope * low)


def _edge(q, x_star, sizes, lowest_size) -> tuple[str | None, str | None]:
    """(side, reason) when the data's optimum is not located inside the sampled sizes, else (None, None).

    An optimum within half a grid step (half the mean spacing of the sizes in ln N) of an end, or on a curve
    whose lowest measured loss is at an end, is an edge too: there the parabola's vertex rests on one side's
    points only, and the true optimum may lie beyond the sizes."""
    low, high = np.log(sizes.min()), np.log(sizes.max())
    margin = (high - low) / (len(sizes) - 1) / 2
    span = f"({sizes.min():.3g} to {sizes.max():.3g})"
    end = {"smaller": "smallest sampled size", "larger": "largest sampled size"}
    at_end = "smaller" if lowest_size == sizes.min() else "larger" if lowest_size == sizes.max() else None
    if not q[2] > 0:
        return at_end, "the parabola opens downward or is flat: no minimum"
    side = "smaller" if x_star < (low + high) / 2 else "larger"
    if not low <= x_star <= high:
        where = "below" if side == "smaller" else "above"
        return side, f"N* = {np.exp(x_star):.3g} lies {where} the {end[side]} {span}"
    if not low + margin <= x_star <= high - margin:
        return side, f"N* = {np.exp(x_star):.3g} lies within half a grid step of the {end[side]} {span}"
    if at_end is not None:
        return at_end, f"the lowest measured loss is at the {end[at_end]} {span}"
    return None, None


def _loglog(log_x: np.ndarray, log_y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares line log_y = a + b·log_x over the masked points; NaN where < 2 points."""
    m = mask.astype(float)
    n = m.sum(axis=1)
    sx, sy = m @ log_x, (m * log_y).sum(axis=1)
    sxx, sxy = m @ (log_x * log_x), (m * log_y) @ log_x
    with np.errstate(divide="ignore", invalid="ignore"):
        b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
        a = (sy - b * sx) / n
    bad = n < 2
    return np.where(bad, np.nan, a), np.where(bad, np.nan, b)


def _ci(draws: np.ndarray) -> tuple[float, float] | None:
    lo, hi = interval(draws)
    return None if np.isnan(lo) else (float(lo), float(hi))


def _holding(estimate: float, ci: tuple[float, float] | None) -> tuple[float, float] | None:
    """The interval, or None where it leaves out its own estimate: no interval beats a misleading one."""
    return ci if ci is not None and ci[0] <= estimate <= ci[1] else None


def _exp(ci):
    return None if ci is None else (float(np.exp(ci[0])), float(np.exp(ci[1])))
