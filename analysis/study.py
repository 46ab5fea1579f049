"""The whole analysis of a runs table: per family Approach 2 and 3 with a shared bootstrap, then the gap."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_RESAMPLES, family_rng, interval, resample_counts
from analysis.frontier import (POWER_LAW, SATURATING, Allocation, ComputeGap, Frontier, chinchilla_allocation,
                               compute_gap, power_law_frontier, saturating_frontier)
from analysis.isoflop import IsoflopFit, bucket_budgets, fit_isoflop
from analysis.parametric import ParametricFit, fit_parametric
from analysis.runs import average_seeds, best_variants

if TYPE_CHECKING:
    from analysis.repetition import Repetition


@dataclass(frozen=True)
class Settings:
    reference: str = "arm"
    bootstrap: int = DEFAULT_RESAMPLES
    seed: int = 0
    budget_tolerance: float = 0.1
    huber_delta: float = 1e-3
    gap_at: tuple[float, ...] = ()
    entropy_rate: float | None = None  # nats/token of the corpus, when known (the synthetic corpus)
    floor: float | None = None  # E of the Chinchilla fit held at this value rather than fitted (--floor)
    floor_source: str | None = None  # where that value came from, for the report
    holdout_largest: bool = False
    compute: str = "nominal"  # the compute axis the table's budgets and sizes are on (analysis/runs.py on_axis)
    fit_rn_star: bool = False  # the data-constrained law discounts excess parameters too (--rn-star)


@dataclass
class FamilyResult:
    name: str
    runs: pd.DataFrame  # with a 'bucket' column: index into budgets
    budgets: np.ndarray
    isoflop: IsoflopFit
    parametric: ParametricFit | None
    frontiers: dict[str, Frontier] = field(default_factory=dict)  # by kind
    n_opt: dict[str, Allocation] = field(default_factory=dict)  # by frontier kind it goes with


@dataclass(frozen=True)
class HoldoutCheck:
    """A fit without the largest budget, predicting that budget's optimum."""
    family: str
    budget: float
    method: str
    predicted_l: float | None
    predicted_l_ci: tuple[float, float] | None
    predicted_n: float | None
    predicted_n_ci: tuple[float, float] | None
    measured_l: float
    measured_l_ci: tuple[float, float] | None
    measured_n: float
    measured_n_ci: tuple[float, float] | None
    measured_from: str
    degenerate: tuple[str, ...] = ()  # the predicting fit's reasons not to be trusted


@dataclass(frozen=True)
class SkippedGap:
    """A compute gap not computed because a frontier's fit is degenerate."""
    reference: str
    other: str
    kind: str
    reason: str


@dataclass
class Study:
    settings: Settings
    families: dict[str, FamilyResult]
    gaps: list[ComputeGap]
    holdout: list[HoldoutCheck]
    notes: list[str]
    skipped_gaps: list[SkippedGap] = field(default_factory=list)
    other_axis: list[str] = field(default_factory=list)  # where the gap on the other compute axis leaves the band
    data_constrained: Repetition | None = None  # where the runs repeated data (analysis/repetition.py)


def analyze(table: pd.DataFrame, settings: Settings, log: Callable[[str], None] = print) -> Study:
    notes: list[str] = []
    families = {}
    for name, runs in table.groupby("family", sort=True):
        families[name] = fit_family(str(name), runs.reset_index(drop=True), settings, log, notes)
    before, skipped = len(notes), []
    gaps = compare_families(families, settings, notes, skipped)
    for note in notes[before:]:
        log(f"note: {note}")
    holdout = holdout_checks(settings, families, log, notes) if settings.holdout_largest else []
    return Study(settings, families, gaps, holdout, notes, skipped)


def fit_family(name: str, runs: pd.DataFrame, settings: Settings, log, notes: list[str]) -> FamilyResult:
    """Both approaches on one family's runs; `runs` of the result are those of each point's best variant."""
    runs, chosen = best_variants(runs)
    _say([f"{name}: {chosen}"] if chosen else [], notes, log)
    labels, budgets = bucket_budgets(runs["budget"].to_numpy(), settings.budget_tolerance)
    runs = runs.assign(bucket=labels)
    points, seed_losses = average_seeds(runs)  # the fits see one point per size: replicate seeds averaged
    n, d, loss, se = (points[c].to_numpy(dtype=float) for c in ("params", "tokens", "loss", "loss_se"))
    point_labels = points["bucket"].to_numpy()
    rng = family_rng(settings.seed, name)
    counts = resample_counts(point_labels, settings.bootstrap, rng) if settings.bootstrap > 0 else None
    start = time.perf_counter()
    averaged = f" ({len(points)} points, replicate seeds averaged)" if len(points) < len(runs) else ""
    log(f"[{name}] {len(runs)} runs{averaged} at {len(budgets)} budget(s); "
        f"Approach 2 with {settings.bootstrap} bootstrap resamples")
    iso = fit_isoflop(n, d, loss, point_labels, budgets, settings.bootstrap, rng, family=name, loss_se=se,
                      seed_losses=seed_losses)
    _say(iso.notes, notes, log)
    para = None
    if len(points) >= 5:
        log(f"[{name}] Approach 3: L-BFGS from the start grid, then {settings.bootstrap} bootstrap refits")
        para = fit_parametric(n, d, loss, delta=settings.huber_delta, counts=counts, family=name,
                              fixed_e=settings.floor)
        _say(para.notes, notes, log)
    else:
        _say([f"{name}: Approach 3 needs >= 5 runs (replicate seeds count once), have {len(points)}; not fitted"],
             notes, log)
    log(f"[{name}] fits and bootstrap done in {time.perf_counter() - start:.1f} s")

    result = FamilyResult(name, runs, budgets, iso, para)
    sampled = (float(runs["budget"].min()), float(runs["budget"].max()))
    if iso.l_opt_law is not None:
        used = [b.budget for b in iso.buckets if b.usable]
        span = (min(used), max(used))
        no_draws = np.empty((0, 2))
        result.frontiers[POWER_LAW] = power_law_frontier(iso.l_opt_law, iso.draws.get("l_opt", no_draws), span)
        result.n_opt[POWER_LAW] = Allocation(iso.n_opt_law, iso.draws.get("n_opt", no_draws), span)
    if para is not None:
        result.frontiers[SATURATING] = saturating_frontier(para.law, para.draws, sampled, para.degenerate)
        result.n_opt[SATURATING] = chinchilla_allocation(para.law, para.draws, sampled)
    return result


def compare_families(families: dict[str, FamilyResult], settings: Settings, notes: list[str],
                     skipped: list[SkippedGap] | None = None) -> list[ComputeGap]:
    """Each family against the reference, on every frontier kind both have; `skipped` collects the gaps left
    out because a frontier's fit is degenerate (docs/method.md §6)."""
    ref = settings.reference
    skipped = [] if skipped is None else skipped
    if len(families) < 2:
        return []
    if ref not in families:
        notes.append(f"reference family {ref!r} not in the table (families: {', '.join(families)}); no compute gap")
        return []
    gaps = []
    for other in (f for f in families if f != ref):
        a, b = families[ref], families[other]
        kinds = [k for k in (POWER_LAW, SATURATING) if k in a.frontiers and k in b.frontiers]
        if not kinds:
            notes.append(f"no frontier fitted for both {ref} and {other}: no compute gap")
        for kind in kinds:
            if _degenerate_gap(a, b, kind, skipped, notes):
                continue
            at = settings.gap_at or _default_losses(a.frontiers[kind], b.frontiers[kind])
            gaps.append(compute_gap(ref, a.frontiers[kind], other, b.frontiers[kind], at,
                                    a.n_opt.get(kind), b.n_opt.get(kind)))
    return gaps


def holdout_checks(settings: Settings, full: dict[str, FamilyResult], log, notes: list[str]) -> list[HoldoutCheck]:
    checks = []
    for name, result in full.items():
        if len(result.budgets) < 3:
            notes.append(f"{name}: --holdout-largest needs >= 3 budgets, have {len(result.budgets)}; skipped")
            continue
        top = len(result.budgets) - 1
        held = result.runs[result.runs["bucket"] == top]
        rest = result.runs[result.runs["bucket"] != top].drop(columns="bucket").reset_index(drop=True)
        log(f"[{name}] --holdout-largest: refitting without C={result.budgets[top]:.3g}")
        refit_notes: list[str] = []
        fit = fit_family(name, rest, settings, log, refit_notes)
        notes.extend(f"holdout fit: {note}" for note in refit_notes)
        measured = result.isoflop.buckets[top]
        if measured.usable:
            m = (measured.l_opt, measured.l_opt_ci, measured.n_opt, measured.n_opt_ci, "parabola optimum")
        else:
            best = held.loc[held["loss"].idxmin()]
            m = (float(best["loss"]), None, float(best["params"]), None, "lowest-loss run (no interior optimum)")
        c = float(result.budgets[top])
        for kind, method in ((POWER_LAW, "IsoFLOP power laws"), (SATURATING, "parametric law")):
            if kind not in fit.frontiers:
                continue
            frontier, alloc = fit.frontiers[kind], fit.n_opt[kind]
            l_draws = frontier.draws[:, 0] + frontier.draws[:, 1] * c ** -frontier.draws[:, 2]
            n_draws = np.exp(alloc.draws[:, 0] + alloc.draws[:, 1] * np.log(c))
            checks.append(HoldoutCheck(name, c, method, float(frontier.loss(c)), _ci(l_draws),
                                       float(alloc.law(c)), _ci(n_draws), *m, degenerate=frontier.degenerate))
    return checks


def _degenerate_gap(ref: FamilyResult, other: FamilyResult, kind: str, skipped: list[SkippedGap],
                    notes: list[str]) -> bool:
    """True (with a note) when either family's frontier of this kind comes from a degenerate fit: a gap read
    off a collapsed law (say E = 0 with a zero-width interval) would look precise and mean nothing."""
    bad = [f for f in (ref, other) if f.frontiers[kind].degenerate]
    if not bad:
        return False
    why = "; ".join(f"{f.name}: {', '.join(f.frontiers[kind].degenerate)}" for f in bad)
    reason = f"degenerate Chinchilla fit ({why})"
    skipped.append(SkippedGap(ref.name, other.name, kind, reason))
    notes.append(f"no {kind.replace('_', ' ')} compute gap {other.name}/{ref.name}: {reason}; "
                 "its frontier is left out of the gap")
    return True


def _default_losses(a: Frontier, b: Frontier) -> tuple[float, ...]:
    """Middle of the losses both families reach (or of their union when they do not overlap)."""
    (lo_a, hi_a), (lo_b, hi_b) = a.loss_range, b.loss_range
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if lo > hi:
        lo, hi = min(lo_a, lo_b), max(hi_a, hi_b)
    return (float(f"{(lo + hi) / 2:.3g}"),)


def _ci(draws: np.ndarray) -> tuple[float, float] | None:
    if not len(draws):
        return None
    lo, hi = interval(draws)
    return None if np.isnan(lo) else (float(lo), float(hi))


def _say(messages: list[str], notes: list[str], log) -> None:
    for message in messages:
        log(f"note: {message}")
        notes.append(message)


def other_axis_check(settings: Settings, study: Study, moved: pd.DataFrame, axis: str) -> list[str]:
    """The headline gap measured again with the runs on the other compute axis (`moved`, point estimates, at the
    same losses, on whichever frontier leads there): where it falls outside this axis's band, both numbers."""
    if not study.gaps:
        return []
    gap = study.gaps[0]
    twin = analyze(moved, replace(settings, compute=axis, bootstrap=0, holdout_largest=False,
                                  gap_at=tuple(p.loss for p in gap.at)), log=lambda message: None)
    lines = []
    for here, there in zip(gap.at, twin.gaps[0].at if twin.gaps else []):
        if None in (here.lo, here.hi, here.gap, there.gap) or here.lo <= there.gap <= here.hi:
            continue
        lines.append(f"On {axis} FLOPs the {gap.other}/{gap.reference} gap at L = {here.loss:.3g} is {there.gap:.3g}x "
                     f"({twin.gaps[0].kind.replace('_', ' ')} frontiers), outside this axis's 95% band "
                     f"{here.lo:.3g}-{here.hi:.3g} (here {here.gap:.3g}x, {gap.kind.replace('_', ' ')} frontiers).")
    return lines
