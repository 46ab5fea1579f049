"""Figures of a study, each written as PNG and PDF. ARM and MDM always get the same colours.

Figures are built on matplotlib's object API (no pyplot, no global backend or style change), so they
render with Agg when saved, from a script or inside a notebook alike.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from analysis.bootstrap import interval
from analysis.runs import SIZE_NAMES, average_seeds
from analysis.study import Study

FAMILY_COLOURS = {"arm": "#1f5fa8", "mdm": "#c8402a"}
OTHER_COLOURS = ["#2a9d4b", "#8e44ad", "#d08c00", "#555555", "#17becf"]
BUDGET_CMAP = "viridis"
KIND_TITLES = {"power_law": "on IsoFLOP power-law frontiers $L^* = K\\,C^{-\\gamma}$",
               "saturating": "on Chinchilla-law frontiers $L^* = E + K\\,C^{-\\gamma}$"}
DEGENERATE_COLOUR, DEGENERATE_STYLE = "0.55", "--"  # a degenerate fit's curves: grey, dashed, labelled so
STYLE = {"figure.dpi": 110, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False, "font.size": 9}


def family_colour(name: str, order: list[str]) -> str:
    if name in FAMILY_COLOURS:
        return FAMILY_COLOURS[name]
    others = [f for f in order if f not in FAMILY_COLOURS]
    return OTHER_COLOURS[others.index(name) % len(OTHER_COLOURS)] if name in others else OTHER_COLOURS[0]


def render(name: str, study: Study, out: Path) -> list[Path]:
    """Draw one figure and write it as out/name.png and out/name.pdf; [] when the study lacks its data."""
    return draw_figure(lambda: FIGURES[name](study), name, out)


def draw_figure(make, name: str, out: Path) -> list[Path]:
    """make() in the house style, written as out/name.png and .pdf; [] when it returns no figure."""
    with matplotlib.rc_context(STYLE):
        fig = make()
        if fig is None:
            return []
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{name}.png", out / f"{name}.pdf"]
        for path in paths:
            fig.savefig(path, bbox_inches="tight")
    return paths


def plot_all(study: Study, out: Path) -> dict[str, list[Path]]:
    """Every figure the study has data for: name -> [png, pdf]."""
    return {name: paths for name in FIGURES if (paths := render(name, study, out))}


def isoflop_curves(study: Study):
    fams = list(study.families.values())
    if not fams:  # every run repeated data: only the data-constrained figure has points
        return None
    fig = Figure(figsize=(5.2 * len(fams), 4.2))
    axes = fig.subplots(1, len(fams), squeeze=False)
    norm = _budget_norm(study)
    error_bars = False
    for ax, fam in zip(axes[0], fams):
        runs = fam.runs
        points = average_seeds(runs)[0]  # what the parabolas were fitted to
        cmap = matplotlib.colormaps[BUDGET_CMAP]
        for k, bucket in enumerate(fam.isoflop.buckets):
            colour = cmap(norm(bucket.budget))
            sel = points[points["bucket"] == k]
            ax.scatter(sel["params"], sel["loss"], s=16, color=colour, alpha=0.8, zorder=3,
                       label=f"C = {bucket.budget:.3g}")
            known = sel[np.isfinite(sel["loss_se"]) & (sel["loss_se"] > 0)]
            if len(known):
                ax.errorbar(known["params"], known["loss"], yerr=known["loss_se"], fmt="none", ecolor=colour,
                            elinewidth=0.8, capsize=2, alpha=0.8, zorder=3)
                error_bars = True
            if bucket.parabola is None:
                continue
            n = np.geomspace(bucket.n_range[0] / 1.3, bucket.n_range[1] * 1.3, 100)
            q0, q1, q2 = bucket.parabola
            ax.plot(n, q0 + q1 * np.log(n) + q2 * np.log(n) ** 2, color=colour, lw=1.2)
            if bucket.edge:  # no optimum located: the lowest measured point, crossed
                ax.scatter([bucket.lowest[0]], [bucket.lowest[2]], marker="x", s=50, color="k", zorder=4)
            else:
                xerr = _err(bucket.n_opt, bucket.n_opt_ci)
                ax.errorbar([bucket.n_opt], [bucket.l_opt], xerr=xerr, fmt="*", ms=11, color=colour,
                            mec="k", mew=0.6, ecolor="k", elinewidth=0.8, capsize=2, zorder=5)
        lo, hi = runs["loss"].min(), runs["loss"].max()
        ax.set_ylim(lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo))  # edge parabolas may run off; keep the data in view
        ax.set_xscale("log")
        # sizes often span less than a decade: label 1-2-5 steps as 2k, 50M, ... instead of crowded powers of ten
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short_count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(SIZE_NAMES[study.settings.compute])
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{fam.name}: IsoFLOP curves", color=family_colour(fam.name, list(study.families)))
    legend = {}
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    legend["optimum N* (95% CI)"] = Line2D([], [], marker="*", ls="", color="grey", mec="k", ms=10)
    if error_bars:
        legend["±1 s.e. between sizes (seeds or MC)"] = Line2D([], [], marker="|", ls="", color="grey", ms=10)
    if any(b.edge for fam in fams for b in fam.isoflop.buckets):
        legend["edge optimum (excluded)"] = Line2D([], [], marker="x", ls="", color="k")
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), title="budget (FLOPs)", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def frontiers(study: Study):
    fams = [f for f in study.families.values() if f.frontiers]
    if not fams:
        return None
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    order = list(study.families)
    c_lo = min(f.runs["budget"].min() for f in fams) / 1.5
    c_hi = max(f.runs["budget"].max() for f in fams) * 1.5
    gap, c_ref = _gap_arrow(study)
    if gap is not None:
        c_lo, c_hi = min(c_lo, c_ref / 1.5), max(c_hi, c_ref * gap.at[0].gap * 1.5)
    budgets = np.geomspace(c_lo, c_hi, 200)
    for fam in fams:
        colour = family_colour(fam.name, order)
        _optima(ax, fam, "l_opt", colour, label=f"{fam.name}: IsoFLOP optima L*")
        for kind, style in (("power_law", "-"), ("saturating", ":")):
            if kind not in fam.frontiers:
                continue
            fr = fam.frontiers[kind]
            inside = (budgets >= fr.budget_range[0]) & (budgets <= fr.budget_range[1])
            law = f"{_num(fr.K)}\\,C^{{{-fr.gamma:.3f}}}"
            label = (f"{fam.name}: $L^* = {law}$" if kind == "power_law"
                     else f"{fam.name}: $L^* = {fr.E:.3g} + {law}$")
            line_style, line_colour = (DEGENERATE_STYLE, DEGENERATE_COLOUR) if fr.degenerate else (style, colour)
            label += " (degenerate: not used for the gap)" if fr.degenerate else ""
            ax.plot(budgets[inside], fr.loss(budgets[inside]), line_style, color=line_colour, lw=1.6, label=label)
            ax.plot(budgets, fr.loss(budgets), line_style, color=line_colour, lw=0.9, alpha=0.45)
    if gap is not None:
        point = gap.at[0]
        ax.annotate("", xy=(c_ref * point.gap, point.loss), xytext=(c_ref, point.loss),
                    arrowprops={"arrowstyle": "<->", "color": "k", "lw": 1.0})
        ax.text(np.sqrt(c_ref * c_ref * point.gap), point.loss, f"{gap.other} needs {point.gap:.3g}× the {gap.reference}'s\ncompute at L = {point.loss:.3g}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("compute-optimal loss L* (nats/token)")
    ax.set_title("Compute-optimal frontiers (thin: extrapolated)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def optimal_allocation(study: Study):
    fams = [f for f in study.families.values() if f.n_opt]
    if not fams:
        return None
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    order = list(study.families)
    for fam in fams:
        colour = family_colour(fam.name, order)
        c = np.geomspace(fam.runs["budget"].min() / 1.2, fam.runs["budget"].max() * 1.2, 100)
        for ax, attr, law_name in ((axes[0], "n_opt", "n_opt_law"), (axes[1], "d_opt", "d_opt_law")):
            _optima(ax, fam, attr, colour)
            law = getattr(fam.isoflop, law_name)
            if law is not None:
                ax.plot(c, law(c), "-", color=colour, lw=1.5,
                        label=f"{fam.name}: ${_num(law.coef)}\\,C^{{{law.exponent:.3f}}}$ (IsoFLOP fits)")
                draws = fam.isoflop.draws.get(attr)
                if draws is not None and len(draws):
                    lo, hi = interval(np.exp(draws[:, :1] + draws[:, 1:] * np.log(c)))
                    ax.fill_between(c, lo, hi, color=colour, alpha=0.15, lw=0)
            if fam.parametric is not None:
                log_n, a, log_d, b = fam.parametric.law.allocation()
                coef, exponent = (log_n, a) if attr == "n_opt" else (log_d, b)
                bad = bool(fam.parametric.degenerate)
                ax.plot(c, np.exp(coef) * c ** exponent, DEGENERATE_STYLE if bad else ":",
                        color=DEGENERATE_COLOUR if bad else colour, lw=1.5,
                        label=f"{fam.name}: ${_num(np.exp(coef))}\\,C^{{{exponent:.3f}}}$ "
                              f"(Chinchilla law{', degenerate' if bad else ''})")
    for ax, what in zip(axes, (f"optimal size N* ({SIZE_NAMES[study.settings.compute]})", "optimal data D* (tokens)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    axes[0].set_title("N*(C): points with 95% CI, bands = bootstrap 95%")
    axes[1].set_title("D*(C)")
    fig.tight_layout()
    return fig


def compute_gap(study: Study):
    if not study.gaps:
        return None
    kinds = [k for k in ("power_law", "saturating") if any(g.kind == k for g in study.gaps)]
    fig = Figure(figsize=(5.4 * len(kinds), 4.2))
    axes = fig.subplots(1, len(kinds), squeeze=False, sharey=True)
    order = list(study.families)
    for ax, kind in zip(axes[0], kinds):
        for gap in (g for g in study.gaps if g.kind == kind):
            colour = family_colour(gap.other, order)
            loss = np.array([p.loss for p in gap.curve])
            value, lo, hi = (np.array([np.nan if v is None else v for v in (getattr(p, f) for p in gap.curve)])
                             for f in ("gap", "lo", "hi"))
            inside = ~np.array([p.extrapolated for p in gap.curve])
            ax.fill_between(loss, lo, hi, color=colour, alpha=0.15, lw=0, label="bootstrap 95% band")
            if inside.any():
                lo_in, hi_in = loss[inside].min(), loss[inside].max()
                ax.axvspan(lo_in, max(hi_in, lo_in + 0.005 * np.ptp(loss)), color="0.8", alpha=0.5, lw=0,
                           label=f"losses both {gap.other} and {gap.reference} reach")
                ax.plot(loss, np.where(inside, value, np.nan), "-", color=colour, lw=1.8,
                        label=f"{gap.other} / {gap.reference}, both frontiers measured")
            ax.plot(loss, value, "--", color=colour, lw=1.0, alpha=0.7,
                    label=f"{gap.other} / {gap.reference}, a frontier extrapolated")
            for p in gap.at:
                if p.gap is not None:
                    ax.errorbar([p.loss], [p.gap], yerr=_err(p.gap, (p.lo, p.hi)),
                                fmt="o", color=colour, mec="k", capsize=3, zorder=4)
                    ax.annotate(f"{p.gap:.3g}×" + (" extrapolated" if p.extrapolated else ""), (p.loss, p.gap), textcoords="offset points", xytext=(6, 6),
                                fontsize=8)
        ax.set_yscale("log")
        _plain_log_y(ax)
        ax.set_xlabel("loss L (nats/token)")
        ax.set_title(f"compute gap {KIND_TITLES[kind]}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("compute gap m(L) = C_other(L) / C_ref(L)")
    fig.tight_layout()
    return fig


def parametric_residuals(study: Study):
    fams = [f for f in study.families.values() if f.parametric is not None]
    if not fams:
        return None
    fig = Figure(figsize=(5.2 * len(fams), 3.8))
    axes = fig.subplots(1, len(fams), squeeze=False, sharey=True)
    norm = _budget_norm(study)
    for ax, fam in zip(axes[0], fams):
        r = 100 * fam.parametric.residuals(*(fam.runs[c].to_numpy(float) for c in ("params", "tokens", "loss")))
        points = ax.scatter(fam.runs["params"], r, c=fam.runs["budget"], cmap=BUDGET_CMAP, norm=norm, s=16)
        ax.axhline(0, color="k", lw=0.8)
        delta = 100 * fam.parametric.delta
        ax.axhspan(-delta, delta, color="grey", alpha=0.25, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel(SIZE_NAMES[study.settings.compute])
        ax.set_title(f"{fam.name}: Chinchilla-law residuals{' (degenerate fit)' if fam.parametric.degenerate else ''}",
                     color=family_colour(fam.name, list(study.families)))
        ax.text(0.02, 0.03, f"grey band: ±Huber δ ({fam.parametric.delta:g})", transform=ax.transAxes, fontsize=7,
                color="0.35")
    axes[0][0].set_ylabel("residual ln(L / L̂) (%)")
    fig.colorbar(points, ax=axes[0].tolist(), label="budget C (FLOPs)")
    return fig


FIGURES = {"isoflop_curves": isoflop_curves, "frontiers": frontiers, "optimal_allocation": optimal_allocation,
           "compute_gap": compute_gap, "parametric_residuals": parametric_residuals}


def metric_against_compute(study: Study, metric: str):
    """A downstream metric (a runs-table column such as eval/<task>/acc) against C, per family: every run
    evaluated, and a line through the lowest-loss evaluated run of each budget (the compute-optimal model as
    sampled), with lm-eval's standard error where the table has it (eval/<task>/acc_stderr)."""
    parts = metric.split("/")
    stderr = "/".join([*parts[:2], parts[2] + "_stderr", *parts[3:]]) if len(parts) >= 3 else None
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    order = list(study.families)
    drawn = False
    for fam in study.families.values():
        runs = fam.runs[fam.runs[metric].notna()] if metric in fam.runs.columns else fam.runs.iloc[:0]
        if runs.empty:
            continue
        colour = family_colour(fam.name, order)
        ax.scatter(runs["budget"], runs[metric], s=14, color=colour, alpha=0.35, lw=0, label=f"{fam.name}: runs")
        best = runs.loc[runs.groupby("bucket")["loss"].idxmin()].sort_values("budget")
        ax.plot(best["budget"], best[metric], "o-", color=colour, ms=5, lw=1.5,
                label=f"{fam.name}: lowest-loss run per budget")
        if stderr in best.columns and best[stderr].notna().any():
            ax.errorbar(best["budget"], best[metric], yerr=best[stderr].fillna(0), fmt="none", ecolor=colour,
                        elinewidth=0.8, capsize=2, label=f"{fam.name}: ±1 s.e. (lm-eval's {stderr.split('/')[2]})")
        drawn = True
    if not drawn:
        return None
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_metrics(study: Study, metrics: list[str], out: Path) -> dict[str, list[Path]]:
    """One figure per downstream metric some run has, named metric_<metric with '/' as '_'>: name -> [png, pdf]."""
    names = {metric: "metric_" + re.sub(r"[^\w.-]", "_", metric) for metric in metrics}
    return {names[m]: paths for m in metrics
            if (paths := draw_figure(lambda m=m: metric_against_compute(study, m), names[m], out))}


def _optima(ax, fam, attr: str, colour: str, label: str | None = None) -> None:
    """A family's IsoFLOP optima of `attr` (n_opt, d_opt or l_opt) against C: interior ones with their
    intervals; for edge ones, which locate no optimum, the lowest measured point as a cross (left out of the fits)."""
    ok = [b for b in fam.isoflop.buckets if b.usable]
    if ok:
        yerr = np.hstack([_err(getattr(b, attr), getattr(b, attr + "_ci")) for b in ok])
        ax.errorbar([b.budget for b in ok], [getattr(b, attr) for b in ok], yerr=yerr, fmt="o", ms=5, color=colour,
                    capsize=2, label=label)
    edge = [b for b in fam.isoflop.buckets if b.edge]
    if edge:
        measured = {"n_opt": 0, "d_opt": 1, "l_opt": 2}[attr]
        ax.scatter([b.budget for b in edge], [b.lowest[measured] for b in edge], marker="x", s=40, color=colour,
                   label=f"{fam.name}: edge, lowest measured point (excluded)", zorder=4)


def _gap_arrow(study: Study):
    """(gap, C_ref) for the arrow at the first gap's first loss; (None, None) when that gap has no value."""
    gap = next(iter(study.gaps), None)
    if gap is None or not gap.at or gap.at[0].gap is None:
        return None, None
    ref = study.families[gap.reference].frontiers[gap.kind]
    return gap, float(np.exp(ref.log_compute(gap.at[0].loss)))


def _num(x: float) -> str:
    """3 significant figures as mathtext: 3.34e+03 -> 3.34\\times10^{3}."""
    mantissa, _, exponent = f"{x:.3g}".partition("e")
    return f"{mantissa}\\times10^{{{int(exponent)}}}" if exponent else mantissa


def _budget_norm(study: Study) -> LogNorm:
    budgets = np.concatenate([f.budgets for f in study.families.values()])
    lo, hi = budgets.min(), budgets.max()
    return LogNorm(lo / 1.01, hi * 1.01) if hi > lo else LogNorm(lo / 2, hi * 2)


def _err(value, ci) -> np.ndarray:
    """Error-bar lengths [[below], [above]] from an interval; zero where there is none."""
    if ci is None or ci[0] is None or ci[1] is None:
        return np.zeros((2, 1))
    return np.array([[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]])


def _short_count(v: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _plain_log_y(ax) -> None:
    """Loss and gap axes span about a decade or less: label them in plain numbers, not powers of ten.

    Call after plotting: the ticks are chosen for the final limits.
    """
    lo, hi = ax.get_ylim()
    if hi / lo < 5:
        ticks = MaxNLocator(nbins=9, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
    else:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(lo, hi)
