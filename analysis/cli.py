"""`isoflop analyze`: runs table (file or MLflow) -> fits.json, report.md and figures in --out."""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from analysis.bootstrap import DEFAULT_RESAMPLES
from analysis.plots import plot_all, plot_metrics
from analysis.repetition import analyze_repetition, fresh_runs, has_unique_data
from analysis.repetition_plot import plot_repetition
from analysis.repetition_report import repetition_headline
from analysis.report import headline, sweep_note, write_fits, write_report
from analysis.runs import (COMPUTE_AXES, attach_to_sweep, clean, conform, default_axis, eval_columns, from_mlflow,
                          iso_note, on_axis, parse_map, read_table, write_table)
from analysis.study import Settings, analyze, other_axis_check
from pipeline.errors import IsoflopError, RunsError
from pipeline.mlflow_keys import DEFAULT_TRACKING_URI, resolve_uri


def configure_parser(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", metavar="FILE", help="runs table, .csv or .parquet")
    source.add_argument("--experiment", metavar="NAME", help="read the runs of this MLflow experiment")
    parser.add_argument("--tracking-uri", metavar="URI", default=None,
                        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    parser.add_argument("--map", action="append", metavar="COLUMN=NAME", default=[],
                        help="read schema column COLUMN from the table's column NAME, e.g. loss=val_loss (repeatable)")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for fits.json, report.md and figures (default: results/NAME/analysis, NAME the "
                             "experiment or the runs table's file name)")
    parser.add_argument("--reference", default="arm", help="family the compute gap is measured against (default arm)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="R",
                        help=f"bootstrap resamples (default {DEFAULT_RESAMPLES}; 0 for no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--budget-tolerance", type=float, default=0.1, metavar="FRACTION",
                        help="budgets closer than this (relative) share an IsoFLOP curve (default 0.1)")
    parser.add_argument("--huber-delta", type=float, default=1e-3, metavar="DELTA",
                        help="Huber delta of the Chinchilla fit, on ln L (default 1e-3)")
    parser.add_argument("--holdout-largest", action="store_true",
                        help="also fit without the largest budget and predict its optimum")
    parser.add_argument("--gap-at", default=None, metavar="L1,L2,...",
                        help="losses at which to report the compute gap (default: middle of the shared range)")
    parser.add_argument("--entropy-rate", type=float, default=None, metavar="NATS",
                        help="known entropy rate of the corpus (nats/token), compared with the fitted E")
    parser.add_argument("--floor", default=None, metavar="VALUE|entropy",
                        help="fix E of the Chinchilla law to VALUE (nats/token), or to the corpus entropy rate "
                             "(--entropy-rate or the table's entropy_rate_nats), instead of fitting it")
    parser.add_argument("--compute", choices=COMPUTE_AXES, default=None,
                        help="the compute axis: nominal (the sweep's budgets) or spent (every run's flops_spent); "
                             "default: spent for a sweep budgeted in spent FLOPs, else nominal")
    parser.add_argument("--rn-star", action="store_true",
                        help="where runs repeated data: also fit R*_N, the half-life of parameters beyond what the "
                             "unique data can use (Muennighoff et al. 2023); off by default")
    parser.add_argument("--metric", action="append", metavar="eval/TASK/METRIC", default=[],
                        help="also plot this downstream metric (logged by `isoflop eval`) against compute, per family "
                             "(repeatable)")


def run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        table, source, notes = _load(args)
        settings = replace(_from_table(settings, table, notes), compute=_axis(args.compute, table, notes))
        repeated = has_unique_data(table)
        fresh, fresh_notes = fresh_runs(table) if repeated else (table, [])
        notes += fresh_notes
        fitted = on_axis(fresh, settings.compute)
        notes += iso_note(fresh, settings.compute, settings.budget_tolerance)
        _check_metrics(args.metric, table)
    except IsoflopError as err:  # bad options, a bad table, an unreachable tracking server
        print(f"isoflop analyze: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")

    start = time.perf_counter()
    study = analyze(fitted, settings)
    study.notes[:0] = notes
    study.data_constrained = analyze_repetition(table, settings) if repeated else None
    if default_axis(fresh) == "nominal" and "flops_spent" in fresh.columns and fresh["flops_spent"].notna().all():
        other = "nominal" if settings.compute == "spent" else "spent"
        study.other_axis = other_axis_check(settings, study, on_axis(fresh, other), other)
    out = Path(args.out or f"results/{args.experiment or Path(args.runs).stem}/analysis")
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "runs.csv")
    figures = plot_all(study, out)
    figures.update(plot_metrics(study, args.metric, out))
    figures.update(plot_repetition(study.data_constrained, out))
    fits = write_fits(study, source, out / "fits.json")
    write_report(study, fits, figures, out / "report.md")
    for line in (repetition_headline(study.data_constrained) if repeated else []) + headline(study):
        if line:
            print(line.replace("**", ""))
    print(f"analysis done in {time.perf_counter() - start:.1f} s")
    print(f"wrote {out / 'fits.json'}, {out / 'report.md'} and {len(figures)} figures (PNG + PDF) in {out}/")
    if args.experiment:
        parents = attach_to_sweep(args.experiment, resolve_uri(args.tracking_uri), out, sweep_note(study, figures))
        print(f"attached them to the sweep's MLflow run ({', '.join(parents)}) under analysis/, the headline as its "
              "description" if parents else
              f"note: experiment {args.experiment} has no sweep run to attach the outputs to")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m analysis.cli") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    configure_parser(parser)
    return run(parser.parse_args(argv))


def _axis(requested: str | None, table: pd.DataFrame, notes: list[str]) -> str:
    """The compute axis to fit on: as asked, else the sweep's own; a sweep budgeted in spent FLOPs has that one."""
    own = default_axis(table)
    if own == "spent" and requested == "nominal":
        notes.append("--compute nominal: this sweep's budgets are spent FLOPs, its one compute axis")
    return "spent" if own == "spent" else requested or own


def _settings(args: argparse.Namespace) -> Settings:
    if args.bootstrap < 0:
        raise RunsError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if not 0 <= args.budget_tolerance < 1:
        raise RunsError(f"--budget-tolerance must be in [0, 1), got {args.budget_tolerance}")
    if not args.huber_delta > 0:
        raise RunsError(f"--huber-delta must be > 0, got {args.huber_delta}")
    if args.entropy_rate is not None and not args.entropy_rate >= 0:
        raise RunsError(f"--entropy-rate must be >= 0 nats/token, got {args.entropy_rate}")
    gap_at: tuple[float, ...] = ()
    if args.gap_at:
        try:
            gap_at = tuple(float(v) for v in args.gap_at.split(",") if v.strip())
        except ValueError:
            raise RunsError(f"--gap-at expects comma-separated losses such as 2.5,3.0, got {args.gap_at!r}") from None
        if any(not v > 0 for v in gap_at):
            raise RunsError(f"--gap-at losses must be positive, got {args.gap_at!r}")
    floor, floor_source = _parse_floor(args.floor)
    return Settings(reference=args.reference.strip().lower(), bootstrap=args.bootstrap, seed=args.seed,
                    budget_tolerance=args.budget_tolerance, huber_delta=args.huber_delta, gap_at=gap_at,
                    entropy_rate=args.entropy_rate, holdout_largest=args.holdout_largest, floor=floor,
                    floor_source=floor_source, fit_rn_star=args.rn_star)


def _parse_floor(text: str | None) -> tuple[float | None, str | None]:
    """--floor VALUE|entropy -> (value, source); 'entropy' is resolved once the table is read."""
    if text is None:
        return None, None
    if text.strip().lower() == "entropy":
        return None, "entropy"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise RunsError(f"--floor expects a loss >= 0 in nats/token or 'entropy', got {text!r}")
    return value, f"--floor {text.strip()}"


def _from_table(settings: Settings, table: pd.DataFrame, notes: list[str]) -> Settings:
    """Settings that depend on the runs: the entropy rate the table carries, and the floor checked against
    the losses (every loss is E plus positive terms, so E cannot exceed the lowest; docs/method.md §6)."""
    if settings.entropy_rate is None and "entropy_rate_nats" in table.columns:
        rates = pd.to_numeric(table["entropy_rate_nats"], errors="coerce").dropna().unique()
        if len(rates) == 1:
            settings = replace(settings, entropy_rate=float(rates[0]))
        elif len(rates) > 1:
            notes.append(f"entropy_rate_nats takes {len(rates)} different values in the table; not used")
    flag = settings.floor_source
    if flag == "entropy":
        if settings.entropy_rate is None:
            raise RunsError("--floor entropy needs the corpus entropy rate: pass --entropy-rate NATS or a runs table "
                            "with one entropy_rate_nats value")
        flag = f"--floor entropy ({settings.entropy_rate:.4g} nats/token)"
        settings = replace(settings, floor=settings.entropy_rate,
                           floor_source=f"--floor entropy: the corpus entropy rate {settings.entropy_rate:.4g}")
    if settings.floor is not None:
        lowest = table.loc[table["loss"].idxmin()]
        if settings.floor > lowest["loss"]:
            raise RunsError(f"{flag} is above the lowest observed loss {lowest['loss']:.4g} ({lowest['family']}): "
                            "E cannot exceed a loss")
    return settings


def _check_metrics(metrics: list[str], table: pd.DataFrame) -> None:
    """Each --metric must be a column of the table with a value for some run."""
    for metric in metrics:
        if metric not in table.columns or table[metric].isna().all():
            known = eval_columns(table)
            have = f"its downstream metrics: {', '.join(known)}" if known else "no run has one (see `isoflop eval`)"
            why = "has no values" if metric in table.columns else "is not in the runs table"
            raise RunsError(f"--metric {metric} {why}; {have}")


def _load(args: argparse.Namespace) -> tuple[pd.DataFrame, dict, list[str]]:
    mapping = parse_map(args.map)
    if args.runs:
        raw, source = read_table(args.runs), {"source": str(args.runs)}
    else:
        uri = resolve_uri(args.tracking_uri)  # as the sweep resolves it, so both open the same sqlite file
        raw = from_mlflow(args.experiment, uri, finished_only=False)  # clean() names the unfinished ones
        source = {"source": f"MLflow experiment {args.experiment} at {uri}"}
    table, notes = clean(conform(raw, mapping), mlflow=not args.runs)  # old MLflow runs lack val_mc_stderr
    source.update(n_rows=len(raw), n_runs=len(table), families=sorted(table["family"].unique()))
    return table, source, notes


if __name__ == "__main__":
    sys.exit(main())
