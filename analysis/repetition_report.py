"""The data-constrained study in fits.json (its `data_constrained` entry) and in report.md (its opening section)."""
from __future__ import annotations

import math

from analysis.bootstrap import LEVEL
from analysis.data_constrained import NAMES, R_STAR_BOUNDS, bound_side
from analysis.repetition import Crossover, FamilyFit, Repetition

LAW = ("L = E + A/N'^alpha + B/D'^beta, D' = U + U R*_D (1 - exp(-(D/U - 1)/R*_D)) (Muennighoff et al. 2023); "
       "N' = N, or with R*_N: U_N + U_N R*_N (1 - exp(-(N/U_N - 1)/R*_N)), U_N = min(N, N*(U))")


def repetition_dict(rep: Repetition) -> dict:
    return {"law": LAW, "fit_rn_star": rep.fit_rn, "interval": LEVEL, "r_star_bounds": list(R_STAR_BOUNDS),
            "families": {name: _family(f) for name, f in rep.families.items()},
            "rd_star_ratio": [vars(r) for r in rep.ratios],
            "crossover": [{**vars(c), "extrapolated": _extrapolated(c)} for c in rep.crossovers],
            "notes": rep.notes}


def _family(f: FamilyFit) -> dict:
    fit, law = f.fit, f.fit.law
    return {**{k: getattr(law, k) for k in NAMES}, "ci": fit.ci, "n_points": fit.n_points,
            "unique_sizes": sorted(set(f.points["unique"])), "max_epochs": float(f.points["epochs"].max()),
            "E_fixed": fit.fixed_e, "huber_delta": fit.delta, "objective": fit.objective,
            "degenerate": fit.degenerate}


def repetition_headline(rep: Repetition) -> list[str]:
    """The answer first: each family's R*_D with its band, their ratio, and where the losses cross."""
    if not rep.families:
        return ["**Data-constrained law not fitted** (see the notes)."]
    half_lives = ", ".join(f"{name} {_half_life(f)}" + (" (a degenerate fit: see below)" if f.fit.degenerate else "")
                           for name, f in rep.families.items())
    lines = [f"**Repetition half-life R*_D (epochs, {LEVEL:.0%} band): {half_lives}.**"]
    lines += [f"R*_D of {r.other} / {r.reference}: {_v(r.value, (r.lo, r.hi))}." for r in rep.ratios]
    return lines + [_crossover_sentence(c) for c in rep.crossovers]


def repetition_lines(rep: Repetition) -> list[str]:
    """The report's section: the law, one row per family, the ratio and the crossovers."""
    names = ("E", "A", "B", "alpha", "beta", "rd_star") + (("rn_star",) if rep.fit_rn else ())
    labels = ["E", "A", "B", "α", "β", "R*_D"] + (["R*_N"] if rep.fit_rn else [])
    lines = ["## Data-constrained scaling (repeated data)", "", *repetition_headline(rep), "",
             f"Law: {LAW}. Fitted per family on every run (fresh ones included: there D' = D) by the summed Huber "
             "loss on ln L with L-BFGS from a start grid, as the Chinchilla law is; intervals resample runs within "
             f"each unique-data size. R* is searched within [{R_STAR_BOUNDS[0]:g}, {R_STAR_BOUNDS[1]:g}] epochs.", ""]
    if rep.families:
        lines += ["| family | points | unique sizes | max epochs | " + " | ".join(labels) + " | degenerate |",
                  "|---" * (len(labels) + 5) + "|"]
        for name, f in rep.families.items():
            fit = f.fit
            cells = ["fixed " + _f(fit.fixed_e) if k == "E" and fit.fixed_e is not None
                     else _v(getattr(fit.law, k), fit.ci.get(k)) for k in names]
            lines.append(f"| {name} | {fit.n_points} | {f.points['unique'].nunique()} | "
                         f"{_f(f.points['epochs'].max())} | " + " | ".join(cells) +
                         f" | {'; '.join(fit.degenerate) or 'no'} |")
        lines.append("")
    if rep.crossovers:
        lines += ["Crossover: the compute C = 6ND from which a family's loss at fixed unique data U, each family at "
                  "its compute-optimal size under its own law, falls below the reference's.", "",
                  "| U (tokens) | families | crossover C (FLOPs) | band | draws without | extrapolated |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_f(c.unique)} | {c.other} below {c.reference} | {_crossover_value(c)} | "
                  f"{_crossover_band(c)} | {c.draws_without} | {'yes' if _extrapolated(c) else 'no'} |"
                  for c in rep.crossovers]
        lines.append("")
    return lines + [f"- {n}" for n in rep.notes] + ([""] if rep.notes else [])


def _half_life(f: FamilyFit) -> str:
    """R*_D with its band; at a bound of the search, what the runs do say: a band's other end."""
    value, ci = f.fit.law.rd_star, f.fit.ci.get("rd_star")
    side = bound_side(value)
    if side is None:
        return _v(value, ci)
    end = None if ci is None else ci[0] if side == "upper" else ci[1]
    told = "" if end is None else f"{'>' if side == 'upper' else '<'} {_f(end)} "
    return f"{told}(at the search's {side} bound {_f(value)})"


def _crossover_sentence(c: Crossover) -> str:
    where = f"At U = {_f(c.unique)} unique tokens"
    if c.status == "none":
        return (f"{where} the {c.other}'s compute-optimal loss stays above the {c.reference}'s up to "
                f"C = {_f(c.searched[1])}: no crossover in that range.")
    if c.status == "below":
        return f"{where} the {c.other}'s loss is below the {c.reference}'s from the smallest compute measured on."
    extra = " (extrapolated)" if _extrapolated(c) else ""
    return (f"{where} the {c.other}'s compute-optimal loss falls below the {c.reference}'s from "
            f"C = {_f(c.compute)} FLOPs{extra}, band {_crossover_band(c)}.")


def _crossover_value(c: Crossover) -> str:
    return {"none": f"none up to {_f(c.searched[1])}", "below": f"below from {_f(c.searched[0])}"}.get(
        c.status, _f(c.compute))


def _crossover_band(c: Crossover) -> str:
    if c.lo is None or c.hi is None:
        return "n/a"
    hi = f"beyond {_f(c.searched[1])}" if math.isinf(c.hi) else _f(c.hi)
    return f"[{_f(c.lo)}, {hi}]"


def _extrapolated(c: Crossover) -> bool:
    return c.status == "crosses" and c.compute > c.measured_up_to


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def _v(value, ci) -> str:
    if ci is None or ci[0] is None or ci[1] is None:
        return _f(value)
    return f"{_f(value)} [{_f(ci[0])}, {_f(ci[1])}]"
