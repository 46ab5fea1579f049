"""The data-constrained study's figure: loss against epochs at each unique-data size, measured and fitted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.plots import draw_figure, family_colour
from analysis.repetition import REPEATED, Repetition

MARKERS = "osD^vP*X"


def plot_repetition(rep: Repetition | None, out: Path) -> dict[str, list[Path]]:
    """loss_against_epochs.png/.pdf where the study fitted a law: name -> [png, pdf]."""
    paths = draw_figure(lambda: loss_against_epochs(rep), "loss_against_epochs", out) if rep else []
    return {"loss_against_epochs": paths} if paths else {}


def loss_against_epochs(rep: Repetition) -> Figure | None:
    """One panel per unique-data size U that some run repeated: every run at U (colour: family, marker: size) and
    the fitted law L(N, epochs·U, U) through each family's sizes there."""
    sizes = sorted({u for f in rep.families.values() for u, e in zip(f.points["unique"], f.points["epochs"])
                    if e > REPEATED})
    if not sizes:
        return None
    fig = Figure(figsize=(4.6 * len(sizes), 4.0))
    axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
    order = list(rep.families)
    params = sorted({n for f in rep.families.values() for n in f.points["params"]})
    for ax, unique in zip(axes, sizes):
        for fam in rep.families.values():
            here = fam.points[np.isclose(fam.points["unique"], unique)]
            colour = family_colour(fam.name, order)
            for n, runs in here.groupby("params"):
                marker = MARKERS[params.index(n) % len(MARKERS)]
                ax.scatter(runs["epochs"], runs["loss"], s=22, marker=marker, color=colour, zorder=3)
                epochs = np.geomspace(runs["epochs"].min() / 1.5, runs["epochs"].max() * 1.5, 100)
                ax.plot(epochs, fam.fit.law.loss(n, epochs * unique, unique), "-", color=colour, lw=1.1, alpha=0.8)
        ax.axvline(1, color="0.6", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("epochs D / U")
        ax.set_title(f"U = {unique:.3g} unique tokens")
    axes[0].set_ylabel("validation loss (nats/token)")
    legend = {f"{name}: fitted law, R*_D = {f.fit.law.rd_star:.3g}": Line2D([], [], color=family_colour(name, order))
              for name, f in rep.families.items()}
    legend.update({f"N = {n:,.0f}": Line2D([], [], marker=MARKERS[i % len(MARKERS)], ls="", color="grey")
                   for i, n in enumerate(params)})
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return fig
