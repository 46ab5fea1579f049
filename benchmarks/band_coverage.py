"""Do the analysis's 95% bands cover the truth? Runs tables simulated from a known law, analysed as `isoflop
analyze` analyses them, over many simulated studies.

Truth: an ARM Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta and an MDM law L_mdm(N, D) = L_arm(N, D/k). The
MDM needs k times the ARM's data, hence k times its compute, for the same loss: its frontier is L*_arm(C/k), so
the compute gap is k at every loss, and both families' N*(C) exponent is beta/(alpha + beta). Budgets, sizes (5 per
budget over a factor 6), losses (2.9-3.5 nats) and one seed's noise (0.05 nats for the MDM, 0.01 for the ARM) are
those of the CPU demo (sweeps/demo.yaml, docs/LOG.md). An IsoFLOP curve's shape in ln N depends only on alpha, beta
and its L* - E, so putting all of k into D (the MDM's N* lies far below the demo's) moves its curves along ln N and
changes nothing Approach 2 measures.

Each study draws a runs table, runs `analyze` with the CLI's default settings (1000 bootstrap resamples) and
checks whether the headline gap's band (at the loss the report quotes) and each family's N* exponent band contain
the truth. Two designs: sizes centred on the true N*, and offset in ln N by up to a quarter of their span. The
default 40 studies per design take about 3 minutes on 2 cores (standard error of a 0.95 coverage: 0.035); 400
give 0.011.

Usage: python benchmarks/band_coverage.py [--studies 40] [--workers 2] [--noise mdm=0.05 --noise arm=0.01] [--seeds 2]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from analysis.bootstrap import DEFAULT_RESAMPLES, LEVEL  # noqa: E402
from analysis.parametric import ChinchillaLaw  # noqa: E402
from analysis.runs import clean, conform  # noqa: E402
from analysis.study import Settings, Study, analyze  # noqa: E402

REFERENCE, OTHER = "arm", "mdm"
# The ARM law: N* = 700 and L* = 3.19 at 3e9 FLOPs (the demo's ARM), E at the corpus's entropy rate, N* ~ C^(2/3)
ARM_LAW = ChinchillaLaw(E=2.3, A=3.05, B=250.0, alpha=0.25, beta=0.5)
BUDGETS = {REFERENCE: (3e9, 1e10, 3e10), OTHER: (1e11, 3e11, 1e12)}
NOISE = {REFERENCE: 0.01, OTHER: 0.05}  # seed-to-seed std of one run's loss on the demo, nats
GAP = 150.0
SIZES, SPAN = 5, 6.0
DESIGNS = {"centred": 0.0, "offset": 0.25}  # largest shift of a budget's sizes, as a fraction of their ln-N span
FEW_FAILED = 0.025  # a share of failed resamples up to one tail of the band


@dataclass(frozen=True)
class Truth:
    law: ChinchillaLaw  # the reference family's
    gap: float
    budgets: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(BUDGETS))
    noise: dict[str, float] = field(default_factory=lambda: dict(NOISE))
    seeds: int = 1  # runs per point, each with its own noise draw

    def laws(self) -> dict[str, ChinchillaLaw]:
        # L(N, D/k) = E + A/N^alpha + (B k^beta)/D^beta
        return {REFERENCE: self.law, OTHER: replace(self.law, B=self.law.B * self.gap ** self.law.beta)}

    @property
    def exponent(self) -> float:
        return self.law.allocation()[1]


def true_n_opt(law: ChinchillaLaw, budget: float) -> float:
    log_coef, exponent, _, _ = law.allocation()
    return float(np.exp(log_coef) * budget ** exponent)


def simulate_table(truth: Truth, rng: np.random.Generator, offset: float = 0.0) -> pd.DataFrame:
    """`truth.seeds` runs per point: SIZES sizes per budget over a factor SPAN around the true N* shifted by up to
    `offset` of that span in ln N, loss = L(N, D) + noise. Shifts are drawn even when `offset` is 0, so that
    both designs see the same noise."""
    rows = []
    for family, law in truth.laws().items():
        for budget in truth.budgets[family]:
            shift = rng.uniform(-1, 1) * offset * math.log(SPAN)
            sizes = true_n_opt(law, budget) * math.exp(shift) * np.geomspace(SPAN ** -0.5, SPAN ** 0.5, SIZES)
            for n in sizes:
                d = budget / (6 * n)
                for seed in range(truth.seeds):
                    loss = float(law.loss(n, d)) + truth.noise[family] * rng.standard_normal()
                    rows.append({"family": family, "budget": budget, "params": n, "tokens": d, "loss": loss,
                                 "seed": seed, "flops_convention": "6ND"})
    return pd.DataFrame(rows)


def counting_failures(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile band with every failed (NaN) resample counted against it: below all draws for the lower
    end, above all for the upper. An end is infinite once more than a tail's share of resamples failed."""
    tail = (1 - level) / 2
    lower = np.where(np.isnan(draws), -np.inf, draws)
    upper = np.where(np.isnan(draws), np.inf, draws)
    # inverted_cdf picks a draw, so an infinite one stays infinite (linear interpolation would give NaN)
    return (float(np.quantile(lower, tail, method="inverted_cdf")),
            float(np.quantile(upper, 1 - tail, method="inverted_cdf")))


def record(study: Study) -> dict[str, float | str | bool | None]:
    """The headline gap and each family's N* exponent, with their bands and failed-resample counts."""
    out: dict[str, float | str | bool | None] = {"gap_kind": None}
    if study.gaps:  # the headline: the first gap at the loss the report quotes (one by default)
        point = study.gaps[0].at[0]
        out.update(gap_kind=study.gaps[0].kind, gap_loss=point.loss, gap=point.gap, gap_lo=point.lo,
                   gap_hi=point.hi, gap_extrapolated=point.extrapolated)
    for name, fam in study.families.items():
        iso, law = fam.isoflop, fam.isoflop.n_opt_law
        out[f"{name}_located"] = sum(b.usable for b in iso.buckets)
        out[f"{name}_at_end"] = sum(b.resamples_at_end for b in iso.buckets if b.usable)
        out[f"{name}_failed"] = iso.failed_resamples
        para = fam.parametric
        out[f"{name}_para_failed"] = None if para is None else int(np.isnan(para.draws[:, 0]).sum())
        if law is None:
            continue
        lo, hi = law.exponent_ci or (None, None)
        out.update({f"{name}_exp": law.exponent, f"{name}_exp_lo": lo, f"{name}_exp_hi": hi})
        if "n_opt" in iso.draws:
            out[f"{name}_exp_clo"], out[f"{name}_exp_chi"] = counting_failures(iso.draws["n_opt"][:, 1])
    return out


def run_study(truth: Truth, design: str, index: int, seed: int = 0,
              bootstrap: int = DEFAULT_RESAMPLES) -> dict[str, float | str | bool | None]:
    """One simulated study, analysed with the CLI's default settings (the table cleaned as the CLI cleans it)."""
    rng = np.random.default_rng([seed, index])
    table, _ = clean(conform(simulate_table(truth, rng, DESIGNS[design])))
    with np.errstate(over="ignore"):  # a resample's gap past e^709 overflows to inf, as it should, in many studies
        study = analyze(table, Settings(bootstrap=bootstrap), log=lambda message: None)
    return {"design": design, "study": index, **record(study)}


# ---------------------------------------------------------------- summary
def coverage(covered: pd.Series) -> str:
    """'0.93 ± 0.02 (n)': the share covered with its binomial standard error."""
    n = len(covered)
    if n == 0:
        return "n/a (0)"
    p = float(covered.mean())
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f} ({n})"


def band_row(label: str, runs: pd.DataFrame, prefix: str, truth: float, ratio: bool, lo: str = "_lo",
             hi: str = "_hi") -> list[str]:
    """[band, estimate made, band made, covers the truth, median width, median estimate] over `runs`."""
    est = runs.get(prefix, pd.Series(np.nan, index=runs.index)).astype(float)
    low = runs.get(prefix + lo, pd.Series(np.nan, index=runs.index)).astype(float)
    high = runs.get(prefix + hi, pd.Series(np.nan, index=runs.index)).astype(float)
    has = est.notna() & low.notna() & high.notna()
    covered = (low[has] <= truth) & (truth <= high[has])
    width = (high / low if ratio else high - low)[has]
    finite = width[np.isfinite(width)]
    shown = (f"{finite.median():.3g}{'x' if ratio else ''}" if len(finite) else "n/a") + (
        f" ({(~np.isfinite(width)).mean():.0%} unbounded)" if (~np.isfinite(width)).any() else "")
    return [label, f"{est.notna().mean():.0%}", f"{has.mean():.0%}", coverage(covered), shown,
            f"{est.median():.4g} ({truth:.4g})" if est.notna().any() else "n/a"]


def failure_rows(runs: pd.DataFrame, family: str, truth: float, bootstrap: int) -> list[list[str]]:
    """Coverage of a family's exponent band by how many of its resamples failed (< 2 located optima), over the
    studies that fitted its N*(C) (without it no resample is made, so none fails)."""
    runs = runs[runs.get(f"{family}_exp", pd.Series(np.nan, index=runs.index)).notna()]
    failed = runs[f"{family}_failed"].astype(float)
    few = max(1, int(FEW_FAILED * bootstrap))
    groups = {"none": failed == 0, f"1-{few}": (failed > 0) & (failed <= few), f"> {few}": failed > few}
    rows = []
    for name, mask in groups.items():
        sub = runs[mask]
        rows.append([family, name, f"{mask.mean():.0%}" if len(runs) else "n/a",
                     band_row("", sub, f"{family}_exp", truth, False)[3],
                     band_row("", sub, f"{family}_exp", truth, False, "_clo", "_chi")[3]])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def summary(runs: pd.DataFrame, truth: Truth, bootstrap: int) -> str:
    out = []
    for design, sub in runs.groupby("design", sort=False):
        rows = [band_row(f"gap {OTHER}/{REFERENCE}, headline", sub, "gap", truth.gap, True)]
        for kind, part in sub.groupby("gap_kind"):
            rows.append(band_row(f"  of which {kind} frontiers", part, "gap", truth.gap, True))
        for extrapolated, part in sub[sub["gap"].notna()].groupby("gap_extrapolated"):
            where = "extrapolated" if extrapolated else "measured by both"
            rows.append(band_row(f"  of which at a loss {where}", part, "gap", truth.gap, True))
        for family in truth.laws():
            rows.append(band_row(f"N* exponent {family}", sub, f"{family}_exp", truth.exponent, False))
            rows.append(band_row("  failures counted", sub, f"{family}_exp", truth.exponent, False, "_clo", "_chi"))
        out += [f"\n{design}: {len(sub)} studies; {LEVEL:.0%} bands; widths hi/lo for the gap, hi - lo for exponents",
                table(["band", "estimate", "band made", "covers truth ± se (n)", "median width", "median (truth)"],
                      rows)]
        fail = [r for family in truth.laws() for r in failure_rows(sub, family, truth.exponent, bootstrap)]
        out += ["", f"N* exponent coverage by failed resamples (< 2 located optima, of {bootstrap})",
                table(["family", "failed", "studies", "band covers (n)", "failures counted covers (n)"], fail)]
        out.append(_failure_stats(sub, truth))
    return "\n".join(out)


def _failure_stats(runs: pd.DataFrame, truth: Truth) -> str:
    parts = []
    for family in truth.laws():
        failed, at_end, para, located = (runs[f"{family}_{c}"].astype(float)
                                         for c in ("failed", "at_end", "para_failed", "located"))
        parts.append(f"{family}: located optima per study mean {located.mean():.2f} of {len(truth.budgets[family])}; "
                     f"failed resamples median {failed.median():.0f}, mean {failed.mean():.1f}, "
                     f"max {failed.max():.0f}; resamples at an end of a located curve median {at_end.median():.0f}; "
                     f"parametric refits failed median {para.median():.0f}")
    return "\n".join(parts)


# ---------------------------------------------------------------- main
def run_all(truth: Truth, studies: int, designs: list[str], workers: int, seed: int, bootstrap: int) -> pd.DataFrame:
    jobs = [(design, i) for i in range(studies) for design in designs]
    start, done, rows = time.perf_counter(), 0, []
    every = max(1, len(jobs) // 20)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_study, truth, design, i, seed, bootstrap) for design, i in jobs]
        for future in as_completed(futures):
            rows.append(future.result())
            done += 1
            if done % every == 0 or done == len(jobs):
                elapsed = time.perf_counter() - start
                left = elapsed / done * (len(jobs) - done)
                print(f"  {done}/{len(jobs)} studies, {elapsed:.0f} s, about {left:.0f} s left", flush=True)
    return pd.DataFrame(rows).sort_values(["design", "study"], kind="stable").reset_index(drop=True)


def parse_noise(items: list[str]) -> dict[str, float]:
    noise = dict(NOISE)
    for item in items:
        family, _, value = item.partition("=")
        if family not in noise or not value:
            raise SystemExit(f"--noise expects FAMILY=NATS with FAMILY one of {', '.join(noise)}, got {item!r}")
        noise[family] = float(value)
    return noise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40, help="simulated studies per design (default 40)")
    parser.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {', '.join(DESIGNS)}")
    parser.add_argument("--noise", action="append", default=[], metavar="FAMILY=NATS",
                        help=f"std of one run's loss (default {', '.join(f'{k}={v}' for k, v in NOISE.items())})")
    parser.add_argument("--gap", type=float, default=GAP, help=f"true compute gap k (default {GAP:g})")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="resamples per analysis")
    parser.add_argument("--seeds", type=int, default=1, help="runs per point, each with its own noise (default 1)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", metavar="FILE", help="also write one row per study here")
    args = parser.parse_args(argv)
    truth = Truth(ARM_LAW, args.gap, noise=parse_noise(args.noise), seeds=args.seeds)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if unknown := set(designs) - set(DESIGNS):
        raise SystemExit(f"--designs: unknown {', '.join(sorted(unknown))}; have {', '.join(DESIGNS)}")
    print(f"truth: gap {truth.gap:g}x, N* exponent {truth.exponent:.4g}; noise "
          f"{', '.join(f'{k} {v:g}' for k, v in truth.noise.items())} nats, {truth.seeds} seed(s) per point; {args.studies} studies x {len(designs)} "
          f"design(s), {args.bootstrap} resamples each, {args.workers} worker(s)", flush=True)
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one core per worker
    runs = run_all(truth, args.studies, designs, args.workers, args.seed, args.bootstrap)
    if args.csv:
        runs.to_csv(args.csv, index=False)
    print(summary(runs, truth, args.bootstrap))


if __name__ == "__main__":
    main()
