"""fits.json (every fitted number, with intervals; valid JSON, null for missing) and report.md."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from analysis.bootstrap import LEVEL, interval
from analysis.frontier import POWER_LAW, SATURATING, ComputeGap, Frontier, GapPoint
from analysis.isoflop import BucketOptimum, PowerLaw
from analysis.parametric import NAMES, ChinchillaLaw, ParametricFit
from analysis.repetition_report import repetition_dict, repetition_headline, repetition_lines
from analysis.runs import SIZE_NAMES, conventions
from analysis.study import FamilyResult, Settings, Study

SCHEMA_VERSION = 1


# ---------------------------------------------------------------- fits.json
def fits_dict(study: Study, source: dict) -> dict:
    s = study.settings
    gaps = [_gap(g) for g in study.gaps]
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "input": source,
        "settings": {"reference": s.reference, "bootstrap": s.bootstrap, "seed": s.seed, "interval": LEVEL,
                     "budget_tolerance": s.budget_tolerance, "huber_delta": s.huber_delta,
                     "holdout_largest": s.holdout_largest, "compute": s.compute,
                     "floor": None if s.floor is None else {"value": s.floor, "source": s.floor_source}},
        "entropy_rate_nats": s.entropy_rate,
        "other_axis": study.other_axis,
        "families": {name: _family(fam, s) for name, fam in study.families.items()},
        "compute_gap": gaps[0] if gaps else None,
        "compute_gaps": gaps,
        "compute_gaps_skipped": [{"reference": k.reference, "other": k.other, "frontier": k.kind, "reason": k.reason}
                                 for k in study.skipped_gaps],
        "holdout": [vars(h) for h in study.holdout],
        "data_constrained": repetition_dict(study.data_constrained) if study.data_constrained else None,
        "notes": study.notes,
    })


def write_fits(study: Study, source: dict, path: Path) -> dict:
    fits = fits_dict(study, source)
    path.write_text(json.dumps(fits, indent=2, allow_nan=False) + "\n")
    return fits


def _family(fam: FamilyResult, s: Settings) -> dict:
    iso = fam.isoflop
    return {
        "n_runs": len(fam.runs),
        "isoflop": {
            "applicable": iso.applicable,
            "budgets": [_bucket(b) for b in iso.buckets],
            "n_opt_law": _law(iso.n_opt_law), "d_opt_law": _law(iso.d_opt_law), "l_opt_law": _law(iso.l_opt_law),
            "failed_resamples": iso.failed_resamples,
        },
        "parametric": _parametric(fam.parametric, s) if fam.parametric else None,
        "frontiers": {kind: _frontier(fr) for kind, fr in fam.frontiers.items()},
    }


def _bucket(b: BucketOptimum) -> dict:
    return {"budget": b.budget, "n_runs": b.n_runs, "n_sizes": b.n_sizes, "n_range": b.n_range,
            "n_opt": b.n_opt, "d_opt": b.d_opt, "l_opt": b.l_opt, "tokens_per_param": b.tokens_per_param,
            "edge": b.edge, "edge_side": b.edge_side, "note": b.note,
            "lowest_measured": None if b.lowest is None else dict(zip(("params", "tokens", "loss"), b.lowest)),
            "resamples_at_end": b.resamples_at_end,
            "ci": {"n_opt": b.n_opt_ci, "d_opt": b.d_opt_ci, "l_opt": b.l_opt_ci,
                   "tokens_per_param": b.tokens_per_param_ci}}


def _law(law: PowerLaw | None) -> dict | None:
    if law is None:
        return None
    return {"coef": law.coef, "exponent": law.exponent, "n_points": law.n_points,
            "ci": {"coef": law.coef_ci, "exponent": law.exponent_ci}}


def _parametric(fit: ParametricFit, s: Settings) -> dict:
    law, entropy = fit.law, s.entropy_rate
    out = {k: getattr(law, k) for k in NAMES}
    out["ci"] = fit.ci
    out["degenerate"] = fit.degenerate  # empty when the fit can be trusted; else why not (docs/method.md §6)
    out["E_fixed"] = None if fit.fixed_e is None else {"value": fit.fixed_e, "source": s.floor_source}
    log_n, a, log_d, b = law.allocation()
    draws = [ChinchillaLaw(*row).allocation() if np.all(np.isfinite(row)) else (np.nan,) * 4 for row in fit.draws]
    draws = np.array(draws, dtype=float).reshape(-1, 4)

    def alloc(i: int, coef: float, exponent: float) -> dict:
        ci = interval(draws[:, [i, i + 1]]) if len(draws) else np.full((2, 2), np.nan)
        return {"coef": math.exp(coef), "exponent": exponent,
                "ci": {"coef": np.exp(ci[:, 0]).tolist(), "exponent": ci[:, 1].tolist()}}

    out.update({
        "huber_delta": fit.delta, "objective": fit.objective, "grid_edge": fit.grid_edge,
        "allocation": {"n_opt": alloc(0, log_n, a), "d_opt": alloc(2, log_d, b),
                       "convention": "C = 6ND"},
        "frontier": {"E": law.E, "K": law.frontier_k(), "gamma": law.gamma},
    })
    if entropy is not None:
        e_draws = fit.draws[:, 0] - entropy if len(fit.draws) and fit.fixed_e is None else np.empty(0)
        out["E_minus_entropy_rate"] = {"value": law.E - entropy,
                                       "ci": interval(e_draws).tolist() if len(e_draws) else None}
    return out


def _frontier(fr: Frontier) -> dict:
    return {"kind": fr.kind, "E": fr.E, "K": fr.K, "gamma": fr.gamma, "ci": fr.ci(),
            "budget_range": fr.budget_range, "loss_range": fr.loss_range, "degenerate": fr.degenerate}


def _gap(g: ComputeGap) -> dict:
    return {"reference": g.reference, "other": g.other, "frontier": g.kind,
            "curve": [vars(p) for p in g.curve], "at": [vars(p) for p in g.at],
            "n_opt_ratio": [vars(p) for p in g.n_ratio]}


def _clean(value):
    """numpy -> Python, tuples -> lists, NaN/inf -> None, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------- report.md
def write_report(study: Study, fits: dict, figures: dict[str, list[Path]], path: Path) -> None:
    path.write_text("\n".join(_report_lines(study, fits, figures)) + "\n")


def _report_lines(study: Study, fits: dict, figures: dict[str, list[Path]]) -> list[str]:
    s = study.settings
    src = fits["input"]
    pct, families = f"{LEVEL:.0%}", ", ".join(src.get("families") or study.families)
    lines = ["# IsoFLOP scaling analysis", ""]
    lines += repetition_lines(study.data_constrained) if study.data_constrained else []
    lines += [*headline(study), "",
              f"Input: {src.get('source')} ({src.get('n_runs')} usable runs; families: {families}). "
              f"Intervals are {pct} percentile bootstrap intervals over {s.bootstrap} resamples (seed {s.seed}): "
              "Approach 2 resamples the parabolas' residuals over the runs (a curve's model sizes are a design, "
              "kept fixed), widened by t/z for the few degrees of freedom they leave (the seeds, where 3 sizes per "
              "curve leave none); Approach 3 resamples points within each budget. The compute gap's "
              "band is bias-corrected (Efron's BC percentile interval). Replicate seeds are averaged into one point "
              "per size, a curve with two or more at every size weighted by sqrt(seeds); any other curve whose every "
              "point has the MDM bound's Monte Carlo error is fitted weighted by it. "
              f"Budgets within {s.budget_tolerance:.0%} of each other form one IsoFLOP curve. "
              f"Losses are validation nats/token; N counts {SIZE_NAMES[s.compute]}."
              + (f" E of the Chinchilla law is fixed to {_f(s.floor)} nats/token ({s.floor_source}), not fitted."
                 if s.floor is not None else ""), ""]
    if len(study.families) > 1:  # families are compared on the validation losses their runs logged
        lines += ["Note: an MDM's loss is the negative ELBO, an upper bound on its NLL, compared here directly with "
                  "an ARM's exact cross-entropy, as in the paper (docs/method.md §2).", ""]
    if study.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in study.notes] + [""]

    for name, fam in study.families.items():
        lines += _family_lines(name, fam, fits["families"][name], s.entropy_rate)
    lines += _gap_lines(study)
    if study.holdout:
        lines += ["## Extrapolation check (--holdout-largest)", "",
                  "Fitted without the largest budget; predicted vs measured optimum at that budget.", "",
                  "| family | C | method | L* predicted | L* measured | N* predicted | N* measured | measured from |",
                  "|---|---|---|---|---|---|---|---|"]
        for h in study.holdout:
            method = h.method + (" (degenerate fit)" if h.degenerate else "")
            lines.append(f"| {h.family} | {_f(h.budget)} | {method} | {_v(h.predicted_l, h.predicted_l_ci)} | "
                         f"{_v(h.measured_l, h.measured_l_ci)} | {_v(h.predicted_n, h.predicted_n_ci)} | "
                         f"{_v(h.measured_n, h.measured_n_ci)} | {h.measured_from} |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for name, paths in figures.items():
            lines += [f"![{name}]({paths[0].name})", f"({paths[1].name})", ""]
    return lines


def headline(study: Study) -> list[str]:
    """The answer first: the gap at a loss both families measured, with its band; or, where their measured
    losses do not meet, the extrapolated value and how far beyond the measured compute it reaches."""
    if not study.gaps:
        reason = "one family only" if len(study.families) == 1 else "see the notes"
        return [f"**No compute gap** ({reason}).", f"Compute axis: {compute_axis(study)}.",
                *loss_ranges(study, POWER_LAW)]
    gap, lines = study.gaps[0], []
    frontiers = {name: study.families[name].frontiers[gap.kind] for name in (gap.reference, gap.other)}
    for p in gap.at:
        if p.gap is None:
            lines.append(f"**No compute gap at L = {_f(p.loss)}**: a frontier does not reach that loss.")
            continue
        band = "" if p.lo is None or p.hi is None else f"(95% band {_f(p.lo)}–{_f(p.hi)}) "
        claim = (f"**{gap.other} needs {_f(p.gap)}× {band}the {gap.reference}'s compute to reach "
                 f"L = {_f(p.loss)} nats/token**")
        if not p.extrapolated:
            lines.append(f"{claim}, a loss both families measured ({KIND_NAMES[gap.kind]}).")
            continue
        reach = "; ".join(f"the {name} frontier read {_f(factor)}× {side} its measured budgets"
                          for name, (factor, side) in beyond(frontiers, p.loss).items())
        lines.append(f"{claim}: **extrapolated**, {reach} ({KIND_NAMES[gap.kind]}).")
    lines.append(f"Compute axis: {compute_axis(study)}.")
    return lines + study.other_axis + loss_ranges(study, gap.kind)


def sweep_note(study: Study, figures: dict[str, list[Path]]) -> str:
    """The sweep run's description in MLflow's UI (markdown): the answer with its compute axis, and the files
    attached under analysis/."""
    names = ["report.md", "fits.json", "runs.csv", *(p.name for paths in figures.values() for p in paths[:1])]
    repeated = repetition_headline(study.data_constrained) + [""] if study.data_constrained else []
    return "\n".join(["**IsoFLOP analysis** (`isoflop analyze`)", "", *repeated, *headline(study), "",
                      "Under `analysis/`: " + ", ".join(f"`{name}`" for name in names) + " (each figure also as PDF)."])


CONVENTION_NAMES = {"6ND": "C = 6ND FLOPs (6 x non-embedding parameters x tokens)",
                    "palm": "FLOPs by the palm convention (6 x matmul parameters x tokens, plus attention)",
                    "spent": "spent FLOPs (every matmul, the LM head on the positions the loss scores, attention)"}


def compute_axis(study: Study) -> str:
    """What C counts: spent FLOPs (--compute spent), or the budgets as the runs counted them (flops_convention)."""
    if study.settings.compute == "spent":
        return CONVENTION_NAMES["spent"] + "; N is spent FLOPs per token / 6"
    found = set().union(*(conventions(fam.runs) for fam in study.families.values()))
    if not found:
        return "C in FLOPs as the runs table gives it (no flops_convention recorded)"
    if len(found) > 1:
        return f"mixed FLOP conventions ({', '.join(sorted(found))}): budgets are not comparable"
    value = found.pop()
    return CONVENTION_NAMES.get(value, f"C in FLOPs ({value})")


KIND_NAMES = {POWER_LAW: "power-law frontiers through the IsoFLOP optima",
              SATURATING: "saturating frontiers of the Chinchilla laws"}


def loss_ranges(study: Study, kind: str) -> list[str]:
    """The losses each family's frontier covers over its measured budgets, and where they overlap."""
    spans = {name: fam.frontiers[kind].loss_range for name, fam in study.families.items() if kind in fam.frontiers}
    if not spans:
        return []
    text = ", ".join(f"{name} {_f(lo)}–{_f(hi)}" for name, (lo, hi) in spans.items())
    lo, hi = max(s[0] for s in spans.values()), min(s[1] for s in spans.values())
    meet = "" if len(spans) < 2 else f"; overlap {_f(lo)}–{_f(hi)}" if lo <= hi else "; no overlap"
    return ["", f"Losses measured on the compute-optimal frontiers (nats/token): {text}{meet}."]


def beyond(frontiers: dict[str, Frontier], loss: float) -> dict[str, tuple[float, str]]:
    """Each frontier that must leave its measured budgets to reach `loss`: (by how many times, 'above'|'below')."""
    out = {}
    for name, fr in frontiers.items():
        c = float(np.exp(fr.log_compute(loss)))
        lo, hi = fr.budget_range
        if np.isfinite(c) and c > hi:
            out[name] = (c / hi, "above")
        elif np.isfinite(c) and c < lo:
            out[name] = (lo / c, "below")
    return out


def _family_lines(name: str, fam: FamilyResult, fj: dict, entropy: float | None) -> list[str]:
    iso = fam.isoflop
    lines = [f"## {name}", "", f"{len(fam.runs)} runs at {len(fam.budgets)} budget(s).", "",
             "### Approach 2: IsoFLOP parabolas", ""]
    if not iso.applicable:
        lines += ["Not applicable: no budget has enough model sizes for a parabola (see notes).", ""]
    else:
        lines += ["| C (FLOPs) | runs | sizes | N* | D* (tokens) | D*/N* | L* | edge |", "|---|---|---|---|---|---|---|---|"]
        for b in iso.buckets:
            lines.append(f"| {_f(b.budget)} | {b.n_runs} | {b.n_sizes} | {_bucket_cells(b)} |")
        lines.append("")
        if iso.n_opt_law is not None:
            lines += ["| law | coefficient | exponent | budgets used |", "|---|---|---|---|"]
            left_out = f" ({iso.failed_resamples} resamples with < 2 located optima left out)" \
                if iso.failed_resamples else ""
            for label, law in (("N*(C)", iso.n_opt_law), ("D*(C)", iso.d_opt_law), ("L*(C)", iso.l_opt_law)):
                lines.append(f"| {label} = coef·C^exponent | {_v(law.coef, law.coef_ci)} | "
                             f"{_v(law.exponent, law.exponent_ci)} | {law.n_points}{left_out} |")
            lines.append("")
    lines += ["### Approach 3: Chinchilla law L(N, D) = E + A/N^α + B/D^β", ""]
    p = fj["parametric"]
    if p is None:
        lines += ["Not fitted (see notes).", ""]
        return lines
    lines += _fit_status(p)
    lines += ["| parameter | value | interval |", "|---|---|---|"]
    for key, label in zip(NAMES, ("E", "A", "B", "α", "β")):
        ci = "fixed (--floor)" if key == "E" and p["E_fixed"] else _ci(p['ci'][key])
        lines.append(f"| {label} | {_f(p[key])} | {ci} |")
    al, fr = p["allocation"], p["frontier"]
    lines += ["", f"Huber δ = {p['huber_delta']:g}, objective {_f(p['objective'])}; "
                  f"start grid edge: {', '.join(p['grid_edge']) or 'none'}; "
                  f"degenerate: {'yes' if p['degenerate'] else 'no'}.",
              f"Implied allocation (C = 6ND): N*(C) = {_f(al['n_opt']['coef'])}·C^{_f(al['n_opt']['exponent'])} "
              f"(exponent {_ci(al['n_opt']['ci']['exponent'])}), D*(C) = {_f(al['d_opt']['coef'])}·"
              f"C^{_f(al['d_opt']['exponent'])} (exponent {_ci(al['d_opt']['ci']['exponent'])}).",
              f"Frontier: L*(C) = {_f(fr['E'])} + {_f(fr['K'])}·C^-{_f(fr['gamma'])} (γ = αβ/(α+β)).", ""]
    if entropy is not None:
        e = p["E_minus_entropy_rate"]
        fixed = " (fixed)" if p["E_fixed"] else ""
        lines += [f"Irreducible loss vs the corpus entropy rate: E = {_v(p['E'], p['ci']['E'])}{fixed} nats/token, "
                  f"entropy rate H = {_f(entropy)} nats/token, E − H = {_v(e['value'], e['ci'])}.", ""]
    return lines


def _fit_status(p: dict) -> list[str]:
    """Said before the numbers: whether the fit can be used, and whether E was fitted at all."""
    lines = []
    if p["degenerate"]:
        lines += [f"**Degenerate fit**: {'; '.join(p['degenerate'])}. These numbers do not describe the data's "
                  "scaling; the fit's frontier is left out of the compute gap and drawn grey and dashed. Fixing E "
                  "(--floor VALUE|entropy) or adding budgets may give a usable fit.", ""]
    if p["E_fixed"]:
        lines += [f"E fixed to {_f(p['E_fixed']['value'])} nats/token ({p['E_fixed']['source']}), not fitted.", ""]
    return lines


def _gap_lines(study: Study) -> list[str]:
    skipped = [f"- {k.other} vs {k.reference} ({k.kind.replace('_', ' ')} frontiers): not computed, {k.reason}."
               for k in study.skipped_gaps]
    if not study.gaps:
        return ["## Compute gap", "", "Not computed (see notes).", ""] + (skipped + [""] if skipped else [])
    lines = ["## Compute gap", "",
             "m(L) = C_other(L) / C_reference(L): how many times more compute the other family needs for the same "
             "loss on its frontier. Extrapolated: the loss lies outside a family's fitted budget range.", ""]
    for g in study.gaps:
        lines += [f"### {g.other} vs {g.reference} ({g.kind.replace('_', ' ')} frontiers)", "",
                  "| loss | gap m(L) | extrapolated |", "|---|---|---|"]
        lines += [_gap_row(p) for p in g.at]
        lines += ["", f"Over the curve: {_range(g.curve)}.", ""]
        if g.n_ratio:
            lines += [f"N*_{g.reference} / N*_{g.other} at equal compute:", "",
                      "| C (FLOPs) | ratio | extrapolated |", "|---|---|---|"]
            lines += [f"| {_f(r.budget)} | {_v(r.ratio, (r.lo, r.hi))} | {'yes' if r.extrapolated else 'no'} |"
                      for r in g.n_ratio]
            lines.append("")
    return lines + (skipped + [""] if skipped else [])


def _gap_row(p: GapPoint) -> str:
    return f"| {_f(p.loss)} | {_v(p.gap, (p.lo, p.hi))} | {'yes' if p.extrapolated else 'no'} |"


def _range(curve: list[GapPoint]) -> str:
    inside = [p for p in curve if not p.extrapolated and p.gap is not None]
    if not inside:
        return "the two families' loss ranges do not overlap; every value extrapolates a frontier"
    lo, hi = min(inside, key=lambda p: p.gap), max(inside, key=lambda p: p.gap)
    if lo is hi:
        return f"the two families' loss ranges meet only near L = {_f(lo.loss)}, where the gap is {_f(lo.gap)}×"
    return (f"where both frontiers are measured the gap runs from {_f(lo.gap)}× (L = {_f(lo.loss)}) "
            f"to {_f(hi.gap)}× (L = {_f(hi.loss)})")


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def _ci(ci) -> str:
    return "n/a" if ci is None or ci[0] is None or ci[1] is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def _bucket_cells(b: BucketOptimum) -> str:
    """N*, D*, D*/N*, L* and edge cells of a budget's row: an edge locates no optimum, so it shows the reason
    and, for L*, the lowest measured loss, named as such."""
    dropped = f"; {b.resamples_at_end} resamples at an end of the sizes" if b.resamples_at_end else ""
    if b.edge:
        return f"– | – | – | lowest measured: {_f(b.lowest[2])} | yes: {b.note}{dropped}"
    if b.n_opt is None:
        return f"– | – | – | – | {b.note}"
    return (f"{_v(b.n_opt, b.n_opt_ci)} | {_v(b.d_opt, b.d_opt_ci)} | "
            f"{_v(b.tokens_per_param, b.tokens_per_param_ci)} | {_v(b.l_opt, b.l_opt_ci)} | no{dropped}")


def _v(value, ci) -> str:
    return _f(value) if value is None or _ci(ci) == "n/a" else f"{_f(value)} {_ci(ci)}"
