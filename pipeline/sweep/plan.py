"""Planning a sweep before anything runs: the file checked and expanded into grid points, the data found (or
the built-in corpus generated), the resources matched to the cluster, the tracking store prepared. Every
problem is collected and raised together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.data.dataset import load_dataset
from pipeline.data.synthetic import synthetic
from pipeline.errors import DataError, SweepError, TrackingError
from pipeline.mlflow_keys import resolve_uri
from pipeline.sweep.adaptive import Schedule, schedule
from pipeline.sweep.grid import GridPoint, expand_grid, load_sweep
from pipeline.sweep.ladder import Ladder, plan_ladder
from pipeline.sweep.schema import Resources, SweepConfig

# A trial that drives a Ray Train worker group only waits, so it holds no CPU (which would keep a 2-worker
# trial off a 2-core machine); Tune needs it to hold something, so it holds a little memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


@dataclass
class SweepPlan:
    sweep: SweepConfig
    points: list[GridPoint]
    dropped: list[str]
    tracking_uri: str
    experiment_id: str | None  # None for a dry run, which touches no store
    data: tuple[int, str, int | None] | None = None  # (vocab, fingerprint, training blocks) the grid was planned for
    schedule: Schedule | None = None  # an adaptive sweep's points and decisions so far
    ladder: Ladder | None = None  # a ladder sweep's stable runs and branches (pipeline/sweep/ladder.py)


def plan_sweep(path: str | Path, tracking_uri: str | None = None, *, dry_run: bool = False,
               cluster: dict | None = None) -> SweepPlan:
    """Load and check a sweep file: every problem is collected and raised together, before anything runs.

    `cluster` holds the resources a trial must fit in ({"CPU": n, "GPU": m}); None skips that check.
    """
    sweep = load_sweep(path)
    errors: list[str] = []
    data_dir = Path(sweep.data.path)
    vocab, fingerprint, train_blocks = sweep.data.vocab_size, "", None
    if not (data_dir / "meta.json").exists() and sweep.data.synthetic:  # seconds; the grid needs its vocab
        synthetic(data_dir, tokens=sweep.data.synthetic.tokens, seed=sweep.data.synthetic.seed)
    try:
        info = load_dataset(data_dir).info
        if vocab is not None and vocab != info.vocab_size:
            errors.append(f"data.vocab_size: {vocab} given, but {data_dir} has vocab {info.vocab_size}")
        vocab, fingerprint, train_blocks = info.vocab_size, info.fingerprint, info.train_blocks(sweep.train.seq_len)
    except DataError as err:
        if not (dry_run and vocab):
            errors.append(str(err) + ("" if sweep.data.synthetic else " (prepare it with `isoflop data`)"))
    if cluster is not None and trials_that_fit(sweep.resources, cluster) < 1:
        errors.append(resources_error(sweep.resources, cluster))
    uri, experiment_id = resolve_uri(tracking_uri, sweep.tracking_uri), None
    if not dry_run:
        try:
            experiment_id = tracking.prepare_store(uri, sweep.name)
        except TrackingError as err:
            errors.append(str(err))
    points, dropped, planned, ladder = [], [], None, None
    if vocab:
        try:
            if sweep.adaptive:  # the points placed so far, from the runs finished so far
                results = tracking.settled_results(uri, sweep.name) or {}
                planned = schedule(sweep, vocab, results, fingerprint, train_blocks)
                points, dropped = planned.points, planned.dropped
            else:
                points, dropped = expand_grid(sweep, vocab, fingerprint, train_blocks)
            if not points:
                errors.append("grid: every point was dropped:\n  " + "\n  ".join(dropped))
            if sweep.ladder:
                ladder = plan_ladder(points)
        except SweepError as err:
            errors.append(str(err))
    if errors:
        raise SweepError("\n".join(errors))
    return SweepPlan(sweep, points, dropped, uri, experiment_id, (vocab, fingerprint, train_blocks), planned, ladder)


def trial_resources(resources: Resources) -> dict:
    """What Tune reserves for a trial: all of a one-worker point, else just the driver of its worker group."""
    if resources.workers_per_trial == 1 and not resources.worker_group:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    return DRIVER_RESOURCES


def trials_that_fit(resources: Resources, cluster: dict) -> int:
    """How many trials the cluster holds at once (Tune cannot see Train's placement groups)."""
    cpus = resources.workers_per_trial * resources.cpus_per_worker
    limit = math.floor(cluster.get("CPU", 0) / cpus)
    if resources.gpus_per_worker:
        limit = min(limit, math.floor(cluster.get("GPU", 0) / (resources.workers_per_trial * resources.gpus_per_worker)))
    return limit


def resources_error(resources: Resources, cluster: dict) -> str:
    return (f"resources: a trial needs {resources.workers_per_trial} workers x ({resources.cpus_per_worker} CPU, "
            f"{resources.gpus_per_worker} GPU), more than the cluster has ({cluster})")


def format_loss_ranges(losses: dict[str, list[float]] | None) -> str:
    """Which losses each family's finished runs reached, and where the families overlap: a compute gap is
    measured only at losses both reach (else it extrapolates a frontier)."""
    if losses is None:
        return "losses measured so far: unknown (the tracking store cannot be read)"
    if not losses:
        return "losses measured so far: none (no finished runs yet)"
    spans = {family: (min(values), max(values)) for family, values in sorted(losses.items())}
    text = ", ".join(f"{f} {lo:.4g}-{hi:.4g} ({len(losses[f])} runs)" for f, (lo, hi) in spans.items())
    if len(spans) > 1:
        lo, hi = max(s[0] for s in spans.values()), min(s[1] for s in spans.values())
        text += f"; overlap {lo:.4g}-{hi:.4g}" if lo <= hi else "; no overlap"
    return f"losses measured so far (finished runs): {text}"
