"""Data-constrained scaling of a runs table (docs/method.md §6, "Data-constrained scaling"): each family's law with
repeated data (analysis/data_constrained.py), the ratio of the families' repetition half-lives R*_D, and the
compute at which a family's loss at fixed unique data falls below the reference family's. It runs where the
table records unique data (a sweep's `unique_tokens:`); the fits that assume fresh data then take only the runs
that saw none of it twice (`fresh_runs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from analysis.bootstrap import LEVEL, family_rng, resample_counts
from analysis.data_constrained import DataConstrainedFit, DataConstrainedLaw, fit_data_constrained
from analysis.runs import average_seeds, best_variants
from analysis.study import Settings

REPEATED = 1.01  # epochs above this are repeated data; a subset's whole blocks leave a fresh run near 1.00
CROSSOVER_REACH = 100.0  # crossovers are searched up to this many times the largest compute measured
CROSSOVER_STEPS = 81


@dataclass(frozen=True)
class FamilyFit:
    name: str
    points: pd.DataFrame  # what was fitted: params, tokens, unique (U), epochs (D/U), loss
    fit: DataConstrainedFit


@dataclass(frozen=True)
class HalfLifeRatio:
    """R*_D of `other` over R*_D of `reference`, its band pairing bootstrap draw r of each."""
    other: str
    reference: str
    value: float
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class Crossover:
    """Where `other`'s compute-optimal loss at U unique tokens first falls below `reference`'s, on C = 6ND.
    status: 'crosses' (at `compute`), 'below' (already at the smallest compute measured) or 'none' (not up to
    `searched[1]`). The band holds the draws that cross at their compute, the others at the ends they lie beyond
    (inf for 'none'), so a band reaching past the search says so."""
    other: str
    reference: str
    unique: float
    status: str
    compute: float | None
    lo: float | None
    hi: float | None
    searched: tuple[float, float]
    measured_up_to: float  # the largest compute of a run: beyond it the crossover is extrapolated
    draws_without: int  # bootstrap draws that do not cross inside the search


@dataclass
class Repetition:
    families: dict[str, FamilyFit]
    ratios: list[HalfLifeRatio] = field(default_factory=list)
    crossovers: list[Crossover] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fit_rn: bool = False


def has_unique_data(table: pd.DataFrame) -> bool:
    return "unique_tokens" in table.columns and bool(table["unique_tokens"].notna().any())


def fresh_runs(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The runs that saw no token twice, for the fits that assume fresh data, and a note on those left out."""
    repeated = _column(table, "epochs") > REPEATED
    if not repeated.any():
        return table, []
    note = (f"{int(repeated.sum())} of {len(table)} runs repeated data (epochs > {REPEATED:g}): the IsoFLOP and "
            "Chinchilla fits, which assume fresh data, leave them out; the data-constrained fit takes every run")
    return table[~repeated].reset_index(drop=True), [note]


def unique_data(runs: pd.DataFrame) -> np.ndarray:
    """Each run's unique tokens U: its unique_tokens, else for a run that repeated its whole corpus tokens/epochs,
    else its tokens (fresh data)."""
    tokens, epochs, given = (_column(runs, c) for c in ("tokens", "epochs", "unique_tokens"))
    whole = np.where(epochs > 1, tokens / np.where(epochs > 1, epochs, 1), tokens)
    return np.where(np.isnan(given), whole, given)


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    """A column as floats; NaN throughout where the table lacks it."""
    return table[name].to_numpy(dtype=float) if name in table.columns else np.full(len(table), np.nan)


def analyze_repetition(table: pd.DataFrame, settings: Settings, log: Callable[[str], None] = print) -> Repetition:
    notes: list[str] = []
    families = {}
    for name, runs in table.groupby("family", sort=True):
        fitted = fit_family(str(name), runs.reset_index(drop=True), settings, log, notes)
        if fitted is not None:
            families[str(name)] = fitted
    rep = Repetition(families, notes=notes, fit_rn=settings.fit_rn_star)
    ref = families.get(settings.reference)
    for other in (f for f in families.values() if ref is not None and f is not ref):
        rep.ratios.append(half_life_ratio(other, ref))
        rep.crossovers += crossovers(other, ref)
    return rep


def fit_family(name: str, runs: pd.DataFrame, settings: Settings, log, notes: list[str]) -> FamilyFit | None:
    """The law on one family's points (best variant, seeds averaged); None, with a note, where it cannot be
    fitted: no run repeated data, or too few points for its parameters."""
    points = average_seeds(best_variants(runs)[0])[0]
    unique = unique_data(points)
    points = points.assign(unique=unique, epochs=points["tokens"] / unique)
    width = 7 if settings.fit_rn_star else 6
    why = ("no run repeated data (epochs > 1), so R*_D is not measured" if not (points["epochs"] > REPEATED).any()
           else f"{len(points)} points for {width} parameters" if len(points) <= width else "")
    if why:
        _say(f"{name}: data-constrained law not fitted: {why}", notes, log)
        return None
    given = _column(points, "unique_tokens")  # resample within each unique-data size, the whole corpus one of them
    groups = pd.factorize(np.where(np.isnan(given), -1.0, np.round(np.log(given), 6)))[0]
    counts = None
    if settings.bootstrap > 0:
        counts = resample_counts(groups, settings.bootstrap, family_rng(settings.seed, f"{name}/data-constrained"))
    log(f"[{name}] data-constrained law on {len(points)} points ({len(set(groups))} unique-data sizes), "
        f"{settings.bootstrap} bootstrap refits")
    fit = fit_data_constrained(*(points[c].to_numpy(dtype=float) for c in ("params", "tokens", "unique", "loss")),
                               delta=settings.huber_delta, counts=counts, family=name, fixed_e=settings.floor,
                               fit_rn=settings.fit_rn_star)
    for note in fit.notes:
        _say(note, notes, log)
    return FamilyFit(name, points[["params", "tokens", "unique", "epochs", "loss"]], fit)


def half_life_ratio(other: FamilyFit, ref: FamilyFit) -> HalfLifeRatio:
    value = other.fit.law.rd_star / ref.fit.law.rd_star
    lo, hi = _band(other.fit.draws[:, 5] / ref.fit.draws[:, 5]) if len(other.fit.draws) else (None, None)
    return HalfLifeRatio(other.name, ref.name, value, lo, hi)


def crossovers(other: FamilyFit, ref: FamilyFit) -> list[Crossover]:
    """One per unique-data size both families trained on."""
    both = pd.concat([other.points, ref.points])
    measured = float((6 * both["params"] * both["tokens"]).max())
    searched = (float((6 * both["params"] * both["tokens"]).min()), measured * CROSSOVER_REACH)
    grid = np.geomspace(*searched, CROSSOVER_STEPS)
    sizes = sorted(set(other.points["unique"][other.points["epochs"] > REPEATED])
                   & set(ref.points["unique"][ref.points["epochs"] > REPEATED]))
    pairs = [(o, r) for o, r in zip(other.fit.draw_laws(), ref.fit.draw_laws()) if o is not None and r is not None]
    out = []
    for unique in sizes:
        status, compute = _crossing(other.fit.law, ref.fit.law, grid, unique)
        drawn = [_crossing(o, r, grid, unique) for o, r in pairs]
        at = [c if s == "crosses" else grid[0] if s == "below" else np.inf for s, c in drawn]
        lo, hi = _band(np.array(at)) if at else (None, None)
        out.append(Crossover(other.name, ref.name, float(unique), status, compute, lo, hi, searched, measured,
                             sum(s != "crosses" for s, _ in drawn)))
    return out


def _crossing(other: DataConstrainedLaw, ref: DataConstrainedLaw, grid: np.ndarray,
              unique: float) -> tuple[str, float | None]:
    """('crosses', C) at the first compute where other's optimal loss falls to ref's (log-linear between grid
    points), ('below', None) when it is there from the start, ('none', None) when never on the grid."""
    diff = other.optimal_loss(grid, unique) - ref.optimal_loss(grid, unique)
    below = np.flatnonzero(diff <= 0)
    if not len(below):
        return "none", None
    i = int(below[0])
    if i == 0:
        return "below", None
    share = diff[i - 1] / (diff[i - 1] - diff[i])
    return "crosses", float(np.exp(np.log(grid[i - 1]) + share * np.log(grid[i] / grid[i - 1])))


def _band(draws: np.ndarray) -> tuple[float | None, float | None]:
    """Percentile band at LEVEL over the finite-or-infinite draws (NaN left out); None where too few."""
    draws = draws[~np.isnan(draws)]
    if len(draws) < 2:
        return None, None
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail], method="inverted_cdf")  # exact draws: inf stays inf
    return float(lo), float(hi)


def _say(message: str, notes: list[str], log) -> None:
    log(f"note: {message}")
    notes.append(message)
