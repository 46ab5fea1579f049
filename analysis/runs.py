"""The runs table: read it from a file or MLflow, rename columns, derive tokens, drop unusable rows, and turn
runs into the points the fits use.

Schema: family, budget (C, FLOPs), params (N, non-embedding), tokens (D), loss (validation nats/token),
plus optional run_id, status, flops_convention, entropy_rate_nats, seed, unique_tokens (the unique-data subset a
run repeated, train.unique_tokens; NaN for a run on its whole corpus), epochs (passes over its data: tokens /
unique_tokens where that is known), variant (the recipe values a run tried, e.g. "lr=0.002"; "" when none),
val_stderr (std/sqrt(n) between validation sequences: the error of the absolute level, shared by every run since
all are scored on the same sequences) and val_mc_stderr (the Monte Carlo error of an MDM's bound given those
sequences; 0 for an ARM), and any downstream metrics `isoflop eval` logged, one column each, named as in MLflow
(eval/<task>/<metric>; NaN for runs not evaluated). N and C are counted as in docs/method.md §3, the loss as in §2.

Standard errors: a negative or infinite one is an error. So is one missing in some rows but not others of a
file the user supplies (no guessing which runs it meant). A column absent or empty throughout is unknown,
and the fits are then unweighted. From MLflow, runs finished before val_mc_stderr was logged lack it while
newer ones have it: a family with any run missing it has the column treated as unknown for all its runs
(with a note), since weighting only some of a curve's points by it would mean nothing.

From runs to points (best_variants, then average_seeds): at each (family, budget, params, unique_tokens) the recipe
variant with the lowest mean loss over its seeds is kept; its seeds are averaged into one point whose
comparison error loss_se is the std over seeds / sqrt(n_seeds) with >= 2 seeds (seed-to-seed variation,
MC error included), else val_mc_stderr when known, else NaN. Runs without a seed are points of their own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import RunsError
from pipeline.mlflow_keys import (EVAL_PREFIX, FINISHED, HASH_TAG, NOTE_TAG, SWEEP_TAG, VARIANT_TAG, check_server,
                                  mark_training)

REQUIRED = ("budget", "params", "loss")
COLUMNS = ("family", "budget", "params", "tokens", "loss", "run_id", "status", "flops_convention", "flops_spent",
           "entropy_rate_nats", "seed", "unique_tokens", "epochs", "variant", "val_stderr", "val_mc_stderr")
NUMERIC = ("budget", "params", "tokens", "loss")
STDERRS = ("val_stderr", "val_mc_stderr")
# NaN where missing; never drop a run
OPTIONAL_NUMERIC = ("entropy_rate_nats", "seed", "unique_tokens", "epochs", "flops_spent", *STDERRS)
POINT = ("family", "budget", "params", "unique_tokens", "variant")  # runs sharing these are replicate seeds of a point
PER_RUN = ("run_id", "status", "seed", *STDERRS)  # columns that describe a run, not its point
MAX_LISTED = 6  # points named in a note before "and k more"


def parse_map(items: list[str] | None) -> dict[str, str]:
    """['loss=val_loss', ...] -> {'loss': 'val_loss'}: schema column = column in the input."""
    mapping: dict[str, str] = {}
    for item in items or []:
        target, sep, source = item.partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not target or not source:
            raise RunsError(f"--map expects COLUMN=NAME (e.g. loss=val_loss), got {item!r}")
        if target not in COLUMNS:
            raise RunsError(f"--map {item}: unknown column {target!r}; the schema has {', '.join(COLUMNS)}")
        mapping[target] = source
    return mapping


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RunsError(f"runs file not found: {path}")
    if path.suffix == ".csv":
        return pd.read_csv(path, comment="#")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    raise RunsError(f"runs file must end in .csv or .parquet, got {path.name}")


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False, engine="pyarrow")
    else:
        raise RunsError(f"runs table must be written as .csv or .parquet, got {path.name}")


def conform(raw: pd.DataFrame, mapping: dict[str, str] | None = None) -> pd.DataFrame:
    """Rename to the schema, default the family to 'all', derive tokens = C/(6N) where absent."""
    mapping = mapping or {}
    missing = [source for source in mapping.values() if source not in raw.columns]
    if missing:
        raise RunsError(f"unknown column {missing[0]!r} in --map; the table has {', '.join(map(str, raw.columns))}")
    df = raw.rename(columns={source: target for target, source in mapping.items()})
    df = df.loc[:, ~df.columns.duplicated(keep="last")]  # a mapped column replaces a same-named one
    absent = [c for c in REQUIRED if c not in df.columns]
    if absent:
        raise RunsError(f"runs table lacks column(s) {', '.join(absent)} (has {', '.join(map(str, df.columns))}); "
                        "rename with --map COLUMN=NAME")
    if df.empty:
        raise RunsError("runs table is empty")
    evals = eval_columns(df)
    df = df[[c for c in COLUMNS if c in df.columns] + evals].copy()
    df["family"] = df["family"].astype(str).str.strip().str.lower() if "family" in df.columns else "all"
    if "variant" in df.columns:  # a CSV reads "" back as NaN
        df["variant"] = df["variant"].fillna("").astype(str).str.strip()
    for column in (*NUMERIC, *OPTIONAL_NUMERIC, *evals):
        if column in df.columns:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    if "tokens" not in df.columns:
        df["tokens"] = df["budget"] / (6.0 * df["params"])
    else:  # rows with no token count (e.g. an MLflow run that never logged it) use the 6ND identity
        df["tokens"] = df["tokens"].fillna(df["budget"] / (6.0 * df["params"]))
    if "unique_tokens" in df.columns:  # passes over the subset a run repeated, as the data-constrained law reads them
        subset = df["tokens"] / df["unique_tokens"]
        df["epochs"] = subset.where(df["unique_tokens"].notna(), df["epochs"] if "epochs" in df.columns else np.nan)
    return df.reset_index(drop=True)


def eval_columns(df: pd.DataFrame) -> list[str]:
    """The downstream metrics of a table (eval/<task>/<metric>), in its order."""
    return [str(c) for c in df.columns if str(c).startswith(EVAL_PREFIX)]


def clean(df: pd.DataFrame, mlflow: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Keep the rows a fit can use; each dropped group is named in a message.

    Raises RunsError for a bad standard error among them; `mlflow`: the rows come from MLflow, where old runs
    lack val_mc_stderr (see the module docstring).
    """
    notes: list[str] = []
    keep = np.ones(len(df), dtype=bool)
    checks = []
    if "status" in df.columns:
        status = df["status"].astype("string").str.upper()
        checks.append(((status.notna() & (status != FINISHED)).to_numpy(bool), "status is not FINISHED"))
    for column in NUMERIC:
        checks.append((df[column].isna(), f"{column} is missing or not a number"))
        checks.append((~np.isfinite(df[column].fillna(1.0)), f"{column} is infinite"))
        checks.append((df[column].fillna(1.0) <= 0, f"{column} is zero or negative"))
    for bad, why in checks:
        bad = np.asarray(bad, dtype=bool) & keep
        if bad.any():
            notes.append(f"dropped {bad.sum()} run(s) because {why}: {_describe(df[bad])}")
            keep &= ~bad
    if not keep.any():
        raise RunsError("no usable runs left: " + "; ".join(notes))
    if "flops_convention" in df.columns:
        conventions = df.loc[keep, "flops_convention"].dropna().unique()
        if len(conventions) > 1:
            notes.append(f"runs mix FLOP conventions ({', '.join(map(str, conventions))}): their budgets do not "
                         "measure the same thing")
    kept = df[keep]
    for column in (c for c in STDERRS if c in df.columns):
        _reject_bad(kept, column)
        if column == "val_mc_stderr" and mlflow:
            kept = _unknown_where_partial(kept, column, notes)
        else:
            _reject_partial(kept, column)
    return kept.reset_index(drop=True), notes


def best_variants(runs: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """At each point keep the runs of the recipe variant with the lowest mean loss over its seeds.

    Returns those runs (variant column kept) and, where some point tried several variants, a note naming
    the winners.
    """
    if "variant" not in runs.columns:
        return runs, None
    point = [c for c in POINT[:-1] if c in runs.columns]
    mean = runs.groupby([*point, "variant"], sort=False, dropna=False)["loss"].mean()  # NaN unique_tokens: a group
    per_point = mean.groupby(level=point, sort=False, dropna=False)
    tried = per_point.size().to_numpy()
    if tried.max() < 2:
        return runs, None
    winners = pd.MultiIndex.from_tuples(per_point.idxmin(), names=[*point, "variant"])
    keep = pd.MultiIndex.from_frame(runs[[*point, "variant"]]).isin(winners)
    return runs[keep].reset_index(drop=True), _winners_note(winners[tried > 1], tried[tried > 1])


def average_seeds(runs: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """One point per (family, budget, params, variant) with known seeds; a run without a seed stays a point.

    Returns the points, in the order their first runs come (a table without replicates gives its runs back),
    with loss = the mean over seeds and loss_se its comparison error (module docstring), and the seeds'
    losses as a (points, most seeds) array, NaN-padded on the right.
    """
    group = _replicate_groups(runs)
    by = runs.groupby(group, sort=False)
    points = by[[c for c in runs.columns if c not in PER_RUN]].first().reset_index(drop=True)
    n = by.size().to_numpy()
    points["loss"] = by["loss"].mean().to_numpy()
    single = by["val_mc_stderr"].first().to_numpy() if "val_mc_stderr" in runs.columns else np.nan
    spread = by["loss"].std(ddof=1).to_numpy() / np.sqrt(n)
    points["loss_se"] = np.where(n >= 2, spread, single)
    seed_losses = np.full((len(points), n.max()), np.nan)
    seed_losses[group, by.cumcount().to_numpy()] = runs["loss"].to_numpy(dtype=float)
    return points, seed_losses


COMPUTE_AXES = ("nominal", "spent")
SIZE_NAMES = {"nominal": "non-embedding parameters N",  # what N counts on each axis, for labels
              "spent": "spent parameters N (spent FLOPs per token / 6)"}


def conventions(table: pd.DataFrame) -> set[str]:
    """The FLOP conventions a runs table's budgets were counted in (empty where it records none)."""
    return {str(v) for v in table["flops_convention"].dropna()} if "flops_convention" in table.columns else set()


def default_axis(table: pd.DataFrame) -> str:
    """The sweep's own axis: spent where every run was budgeted in spent FLOPs, else its nominal budgets."""
    return "spent" if conventions(table) == {"spent"} else "nominal"


def on_axis(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    """The runs with budget and size on a compute axis. nominal: as trained. spent: budget = flops_spent and
    size N = flops_spent / (6 D), so that C = 6ND holds on that axis as every fit assumes (the size then counts
    the LM head's and attention's FLOPs too)."""
    if axis == "nominal":
        return table
    have = table["flops_spent"] if "flops_spent" in table.columns else pd.Series(np.nan, index=table.index)
    if have.isna().any():
        raise RunsError(f"--compute spent: {int(have.isna().sum())} of {len(table)} runs have no flops_spent (runs "
                        "trained before isoflop recorded it, or a table without that column); use --compute nominal")
    return table.assign(budget=have, params=have / (6 * table["tokens"]))


def iso_note(table: pd.DataFrame, axis: str, tolerance: float) -> list[str]:
    """Why Approach 2 finds no curves on the spent axis of a sweep budgeted in another convention."""
    if axis != "spent":
        return []
    ratio = table["flops_spent"] / table["budget"]
    spread = ratio.groupby([table["family"], table["budget"]]).agg(lambda r: r.max() / r.min()).max()
    if spread <= 1 + tolerance:
        return []
    return [f"the sweep's budgets are not iso in spent compute (spent/C varies up to {spread:.3g}x within a budget): "
            "IsoFLOP parabolas need equal compute along a curve, so on the spent axis they fit only budgets whose "
            "runs share it, and the frontiers and gap rest on the Chinchilla law (Approach 3), which needs none"]


def load_runs(path: str | Path, mapping: dict[str, str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    return clean(conform(read_table(path), mapping))


def from_mlflow(experiment: str, tracking_uri: str | None = None, finished_only: bool = True) -> pd.DataFrame:
    """One row per grid-point run of an MLflow experiment (runs tagged with the run hash), in the schema."""
    from mlflow.tracking import MlflowClient

    check_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as err:  # an unreachable server or a bad URI
        raise RunsError(f"cannot read MLflow at {tracking_uri}: {str(err).splitlines()[0]}") from None
    if found is None:
        raise RunsError(f"MLflow experiment {experiment!r} not found at {tracking_uri}")
    query = f"attributes.status = '{FINISHED}'" if finished_only else ""
    rows, token = [], None
    while True:  # search_runs pages; params come back as strings and metrics as their last value
        page = client.search_runs([found.experiment_id], query, max_results=1000, page_token=token)
        for run in page:
            if HASH_TAG not in run.data.tags:
                continue  # the sweep's parent run
            params, metrics = run.data.params, run.data.metrics
            rows.append({"family": params.get("family"), "budget": params.get("budget"),
                         "params": params.get("params"), "tokens": params.get("tokens"),
                         "loss": metrics.get("val_loss"), "run_id": run.info.run_id, "status": run.info.status,
                         "flops_convention": params.get("flops_convention"),
                         "entropy_rate_nats": params.get("entropy_rate_nats"), "seed": params.get("seed"),
                         "epochs": params.get("epochs"), "flops_spent": params.get("flops_spent"),
                         "unique_tokens": params.get("train.unique_tokens"),  # "None" for the whole corpus: NaN
                         "variant": run.data.tags.get(VARIANT_TAG, ""),
                         "val_stderr": metrics.get("val_stderr"), "val_mc_stderr": metrics.get("val_mc_stderr"),
                         "run_hash": run.data.tags[HASH_TAG],
                         **{k: v for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}})
        token = page.token
        if not token:
            break
    if not rows:
        raise RunsError(f"MLflow experiment {experiment!r} has no {'finished ' if finished_only else ''}sweep runs")
    df = pd.DataFrame(rows)
    for column in (*NUMERIC, *OPTIONAL_NUMERIC, *eval_columns(df)):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


def attach_to_sweep(experiment: str, tracking_uri: str, folder: Path, note: str = "") -> list[str]:
    """Log the analysis outputs in `folder` to the experiment's sweep run(s) under analysis/, with `note` (markdown)
    as each run's description in MLflow's UI; their run ids. Tags the experiment as model training too, as the
    sweep does, so a store made before the tag opens on its runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    mark_training(client, found)
    parents = client.search_runs([found.experiment_id], f"tags.`{SWEEP_TAG}` != ''", max_results=100)
    for run in parents:
        client.log_artifacts(run.info.run_id, str(folder), "analysis")
        if note:
            client.set_tag(run.info.run_id, NOTE_TAG, note)
    return [run.info.run_id for run in parents]


def _replicate_groups(runs: pd.DataFrame) -> np.ndarray:
    """Point label 0, 1, ... per run, numbered in order of first appearance."""
    if "seed" not in runs.columns:
        return np.arange(len(runs))
    lone = np.where(runs["seed"].isna(), np.arange(len(runs)), -1)  # no seed: not known to be a replicate
    keys = [c for c in POINT if c in runs.columns]
    return runs.assign(_lone=lone).groupby([*keys, "_lone"], sort=False, dropna=False).ngroup().to_numpy()


def _winners_note(winners: pd.MultiIndex, tried: np.ndarray) -> str:
    """'best variant per point ...: lr=0.004 at 10, lr=0.002 at 2; C=1e+19 N=4e+07 lr=0.004 (of 3), ...'."""
    frame = winners.to_frame(index=False)
    tally = frame["variant"].value_counts()
    listed = [f"C={r.budget:.3g} N={r.params:.3g} {r.variant or '(none)'} (of {k})"
              for r, k in zip(frame.head(MAX_LISTED).itertuples(), tried)]
    more = f", and {len(frame) - MAX_LISTED} more" if len(frame) > MAX_LISTED else ""
    return (f"best variant per point (lowest mean loss over seeds) at {len(frame)} point(s) with several: "
            + ", ".join(f"{v or '(none)'} at {k}" for v, k in tally.items()) + "; " + ", ".join(listed) + more)


def _reject_bad(rows: pd.DataFrame, column: str) -> None:
    """A standard error must be finite and >= 0."""
    values = rows[column]
    bad = values.notna() & ~((values >= 0) & (values < np.inf))
    if bad.any():
        index, value = values[bad].index[0], values[bad].iloc[0]
        why = "cannot be negative" if value < 0 else "must be finite"
        raise RunsError(f"{column}: {_label(index, rows.loc[index])} has {value:g}; standard errors {why}")


def _reject_partial(rows: pd.DataFrame, column: str) -> None:
    """A standard error is given for every row or for none."""
    missing = rows[column].isna()
    if missing.any() and not missing.all():
        index = rows.index[missing][0]
        raise RunsError(f"{column}: {_label(index, rows.loc[index])} has none while {(~missing).sum()} other run(s) "
                        "have one; give every run a value (0 where the loss is exact) or leave the column out")


def _unknown_where_partial(rows: pd.DataFrame, column: str, notes: list[str]) -> pd.DataFrame:
    """NaN throughout each family where some runs lack `column` and others have it (old and new runs)."""
    missing = rows[column].isna().groupby(rows["family"]).agg(["sum", "size"])
    partial = missing[(missing["sum"] > 0) & (missing["sum"] < missing["size"])]
    for family, (lacking, total) in partial.iterrows():
        notes.append(f"{family}: {lacking} of {total} runs lack {column} (logged before it existed): treated as "
                     f"unknown for every {family} run, so its single-seed points are fitted unweighted")
    return rows.assign(**{column: rows[column].where(~rows["family"].isin(partial.index))})


def _label(index: object, row: pd.Series) -> str:
    return f"run {row['run_id']}" if "run_id" in row and pd.notna(row["run_id"]) else f"row {index}"


def _describe(rows: pd.DataFrame, limit: int = 8) -> str:
    def one(index, row) -> str:
        return (f"{_label(index, row)} ({row['family']}, C={row['budget']:.3g}, N={row['params']:.3g}, "
                f"loss={row['loss']:.4g})")

    shown = [one(i, r) for i, r in rows.head(limit).iterrows()]
    more = f", and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(shown) + more
