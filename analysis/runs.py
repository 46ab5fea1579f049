"""The runs table: read it from a file or MLflow, rename columns, derive tokens, drop unusable rows.

Schema: family, budget (C, FLOPs), params (N, non-embedding), tokens (D), loss (validation nats/token),
plus optional run_id, status, flops_convention, entropy_rate_nats, seed and epochs (so replicate seeds can
be averaged and epochs shown). N and C are counted as in docs/method.md §3, the loss as in §2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import RunsError
from pipeline.mlflow_keys import FINISHED, HASH_TAG

REQUIRED = ("budget", "params", "loss")
COLUMNS = ("family", "budget", "params", "tokens", "loss", "run_id", "status", "flops_convention",
           "entropy_rate_nats", "seed", "epochs")
NUMERIC = ("budget", "params", "tokens", "loss")
OPTIONAL_NUMERIC = ("entropy_rate_nats", "seed", "epochs")  # numbers, NaN where missing; never drop a run


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
    df = df[[c for c in COLUMNS if c in df.columns]].copy()
    df["family"] = df["family"].astype(str).str.strip().str.lower() if "family" in df.columns else "all"
    for column in (*NUMERIC, *OPTIONAL_NUMERIC):
        if column in df.columns:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    if "tokens" not in df.columns:
        df["tokens"] = df["budget"] / (6.0 * df["params"])
    else:  # rows with no token count (e.g. an MLflow run that never logged it) use the 6ND identity
        df["tokens"] = df["tokens"].fillna(df["budget"] / (6.0 * df["params"]))
    return df.reset_index(drop=True)


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep the rows a fit can use; each dropped group is named in a message."""
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
    return df[keep].reset_index(drop=True), notes


def load_runs(path: str | Path, mapping: dict[str, str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    return clean(conform(read_table(path), mapping))


def from_mlflow(experiment: str, tracking_uri: str | None = None, finished_only: bool = True) -> pd.DataFrame:
    """One row per grid-point run of an MLflow experiment (runs tagged with the run hash), in the schema."""
    from mlflow.tracking import MlflowClient

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
                         "epochs": params.get("epochs"), "run_hash": run.data.tags[HASH_TAG]})
        token = page.token
        if not token:
            break
    if not rows:
        raise RunsError(f"MLflow experiment {experiment!r} has no {'finished ' if finished_only else ''}sweep runs")
    df = pd.DataFrame(rows)
    for column in (*NUMERIC, *OPTIONAL_NUMERIC):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


def _describe(rows: pd.DataFrame, limit: int = 8) -> str:
    def one(index, row) -> str:
        label = f"run {row['run_id']}" if "run_id" in row and pd.notna(row["run_id"]) else f"row {index}"
        return f"{label} ({row['family']}, C={row['budget']:.3g}, N={row['params']:.3g}, loss={row['loss']:.4g})"

    shown = [one(i, r) for i, r in rows.head(limit).iterrows()]
    more = f", and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(shown) + more
