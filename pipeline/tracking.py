"""MLflow: one run per grid point, found again by its hash, so restarts never duplicate a run."""
from __future__ import annotations

import functools
import getpass
import json
import subprocess
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

from pipeline.errors import TrackingError
from pipeline.mlflow_keys import (EXPERIMENT_KIND_TAG, FAILED, FINISHED, HASH_TAG, PARENT_TAG, REASON_TAG, RESUMED_TAG,
                                  SWEEP_TAG, TRAINING_KIND, VARIANT_TAG, check_server, mark_training,
                                  sqlite_store_missing)
from pipeline.model.flops import BudgetPlan
from pipeline.recipe import RunSpec


def prepare_store(uri: str, experiment: str) -> str:
    """Create the database and experiment once, from the driver, before any trial logs (returns its id).

    MLflow's first-time table creation is not safe to run twice at once, so sweeps starting together on
    one sqlite file take turns through a lock file; the database gets write-ahead logging so trials and
    other sweeps read while one writes.
    """
    check_server(uri)
    if not uri.startswith("sqlite:///"):
        return _get_or_create_experiment(uri, experiment, None)
    import fcntl
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with sqlite3.connect(path, timeout=60) as con:
            con.execute("PRAGMA journal_mode=WAL")
        artifacts = (path.parent / "mlartifacts").resolve().as_uri()
        return _get_or_create_experiment(uri, experiment, f"{artifacts}/{experiment}")


def _get_or_create_experiment(uri: str, experiment: str, artifact_location: str | None) -> str:
    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as err:  # a server that does not answer, a bad scheme, ...
        raise TrackingError(f"tracking_uri: cannot reach {uri}: {str(err).splitlines()[0]}") from None
    if found is None:
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except Exception:  # another sweep created it in the meantime
            found = client.get_experiment_by_name(experiment)
    mark_training(client, found)  # one made before isoflop tagged its experiments
    return found.experiment_id


def find_run(client: MlflowClient, experiment_id: str, run_hash: str, tag: str = HASH_TAG):
    runs = client.search_runs([experiment_id], f"tags.`{tag}` = '{run_hash}'", max_results=5,
                              order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def open_sweep_parent(client: MlflowClient, experiment_id: str, sweep_name: str, sweep_file: Path, grid: str) -> str:
    """The sweep's parent run (reused across re-runs of the same sweep), RUNNING again, holding the sweep file
    and its grid; the sweep ends it. `isoflop analyze` attaches its outputs to it."""
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_name}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {SWEEP_TAG: sweep_name, **standard_tags(f"isoflop sweep {sweep_name}")}
        run_id = client.create_run(experiment_id, run_name=f"sweep-{sweep_name}", tags=tags).info.run_id
    client.log_artifact(run_id, str(sweep_file))
    client.log_text(run_id, grid, "grid.txt")
    return run_id


def standard_tags(source: str) -> dict[str, str]:
    """MLflow's own tags, which its UI shows as user, source and version."""
    tags = {MLFLOW_USER: getpass.getuser(), MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "JOB"}
    commit = git_commit()
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def run_params(spec: RunSpec, plan: BudgetPlan, world_size: int, data) -> dict[str, str]:
    """What MLflow shows for a grid point; `data` is the DatasetInfo it trains on."""
    shape = spec.shape
    recipe = spec.train.model_dump()
    params = {
        "family": spec.family, "budget": spec.budget, "model": shape.label, "n_layer": shape.n_layer,
        "n_head": shape.n_head, "d_model": shape.d_model, "d_ff": shape.d_ff, "params": shape.non_embedding_params(),
        "steps": plan.steps, "tokens": plan.tokens, "flops": plan.flops, "flops_spent": plan.flops_spent,
        "tokens_per_param": plan.tokens / shape.non_embedding_params(),
        "epochs": plan.epochs,
        "world_size": world_size, "data_fingerprint": data.fingerprint, "run_hash": spec.run_hash, "git_commit": git_commit(),
        "flops_convention": spec.train.flops_convention, "zero_stage": spec.train.zero_stage, "seed": spec.train.seed,
        **{f"train.{k}": v for k, v in recipe.items()},
    }
    if data.entropy_rate_nats is not None:  # the synthetic corpus: the analysis compares its fitted E with this
        params["entropy_rate_nats"] = data.entropy_rate_nats
    return {k: str(v) for k, v in params.items()}


@functools.cache  # asked for each run's params and tags; the code a process runs does not change under it
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """Get-or-create the MLflow run of one grid point and log to it from rank 0.

    On a resumed attempt, metric steps already logged are skipped, so curves never hold duplicates.
    `variant` is the searched recipe values the point runs with (config.variant_label), "" when none;
    `source` is what MLflow shows as the run's source. `key` = (tag, hash, name) names another kind of run than a
    grid point (a ladder's stable run, pipeline/sweep/ladder.py), found by that tag instead of the run hash.
    """

    def __init__(self, uri: str, experiment_id: str, spec: RunSpec, parent_id: str | None = None,
                 variant: str = "", source: str = "isoflop sweep", key: tuple[str, str, str] | None = None):
        self.client, self.uri = MlflowClient(uri), uri
        self.experiment_id, self.spec = experiment_id, spec
        tag, run_hash, run_name = key or (HASH_TAG, spec.run_hash, spec.run_name)
        found = find_run(self.client, experiment_id, run_hash, tag)
        if found is None:
            tags = {tag: run_hash, VARIANT_TAG: variant, **({PARENT_TAG: parent_id} if parent_id else {}),
                    **standard_tags(source)}
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            self.logged_through = 0
            first = find_run(self.client, experiment_id, run_hash, tag)
            if first.info.run_id != self.run_id:  # another process created the point's run at the same moment
                self.client.delete_run(self.run_id)  # both keep the earliest, so the point has one run
                self.run_id = first.info.run_id
        else:
            self.run_id = found.info.run_id
            if VARIANT_TAG not in found.data.tags:  # a run begun before variants were recorded
                self.client.set_tag(self.run_id, VARIANT_TAG, variant)
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "loss")
            self.logged_through = max((m.step for m in history), default=0)

    def log_params(self, params: dict[str, str], config: dict) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(self.run_id, params=new)
        if "config.json" not in {f.path for f in self.client.list_artifacts(self.run_id)}:
            self.client.log_text(self.run_id, json.dumps(config, indent=2), "config.json")

    def tag(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, rows: list[dict]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, row["step"]) for row in rows if row["step"] > self.logged_through
                   for key, value in row.items() if key != "step"]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        if rows:
            self.logged_through = max(self.logged_through, rows[-1]["step"])

    def watch_system(self):
        """MLflow's own monitor of this machine (CPU, memory, disk, network, and GPUs where present), logging
        `system/...` metrics to the run every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10)
        until its `finish()`; the steps continue those of an earlier attempt."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def finish(self, result: dict, files: list[Path]) -> None:
        """`files`: a finished run folder's (weights, description). The weights are stored once, in the run's
        logged model; a copy among the run's artifacts too would double the store (8.5 GB more per 2121M run)."""
        _, description = files
        self.client.log_artifact(self.run_id, str(description))
        model_id = self.log_model(files)
        # the final metrics belong to the run and to its logged model (MLflow's model view shows them)
        final = [Metric(k, float(result[k]), int(time.time() * 1000), int(result["steps"]), model_id=model_id)
                 for k in ("val_loss", "val_stderr", "val_mc_stderr", "tokens_per_s", "seconds")]
        tags = [RunTag(REASON_TAG, "")]
        if result["resumed_from_step"]:
            tags.append(RunTag(RESUMED_TAG, f"resumed at step {result['resumed_from_step']}"))
        self.client.log_batch(self.run_id, metrics=final, tags=tags)
        self.client.set_terminated(self.run_id, FINISHED)

    def log_model(self, artifacts: list[Path]) -> str:
        """The final weights as an MLflow logged model of this run (what `mlflow.search_logged_models` lists),
        named by the run (MLflow refuses '.' in model names: 1.00e+11 becomes 1_00e+11) and holding its final
        files; once per run, however often the point is resumed."""
        found = logged_models(self.client, self.experiment_id, self.run_id)
        if found and found[0].status == "READY":
            return found[0].model_id
        spec = self.spec
        params = {"family": spec.family, "shape": spec.shape.label, "budget": f"{spec.budget:g}",
                  "run_hash": spec.run_hash, "non_embedding_params": str(spec.shape.non_embedding_params())}
        model = found[0] if found else self.client.create_logged_model(
            self.experiment_id, name=spec.run_name.replace(".", "_"), source_run_id=self.run_id, params=params,
            tags={HASH_TAG: spec.run_hash}, model_type=f"isoflop-{spec.family}")
        for path in artifacts:
            self.client.log_model_artifact(model.model_id, str(path))
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def fail(self, reason: str) -> None:
        self.client.set_tag(self.run_id, REASON_TAG, reason[:5000])
        self.client.set_terminated(self.run_id, FAILED)


def logged_models(client: MlflowClient, experiment_id: str, run_id: str) -> list:
    """The logged models of run `run_id` (one, once its point finished; check `.status == "READY"`: MLflow 3.17's
    search matches no filter on status)."""
    return client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")


def run_status(client: MlflowClient, experiment_id: str, run_hash: str) -> tuple[str | None, str]:
    """(MLflow status or None, failure reason) of a grid point."""
    run = find_run(client, experiment_id, run_hash)
    if run is None:
        return None, ""
    return run.info.status, run.data.tags.get(REASON_TAG, "")


def grid_point_runs(uri: str, experiment: str, where: str = "") -> list | None:
    """The experiment's grid-point runs (`where` narrows them, e.g. by status), read only: [] for a store or
    experiment not created yet, None when the store cannot be read (an unreachable server fails in seconds,
    where the client would retry for minutes)."""
    if sqlite_store_missing(uri):
        return []
    try:
        check_server(uri)
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        query = f"tags.`{HASH_TAG}` != ''" + (f" and {where}" if where else "")
        return [] if found is None else client.search_runs([found.experiment_id], query, max_results=10000)
    except Exception:  # an unreachable server, or one only a cluster reaches
        return None


def measured_losses(uri: str, experiment: str) -> dict[str, list[float]] | None:
    """Validation losses of the experiment's finished grid points, by family, so a dry run can show them
    ({} before any, None when the store cannot be read: the dry run still shows the grid)."""
    runs = grid_point_runs(uri, experiment, f"attributes.status = '{FINISHED}'")
    if runs is None:
        return None
    losses: dict[str, list[float]] = {}
    for run in runs:
        if "val_loss" in run.data.metrics:
            losses.setdefault(run.data.params.get("family", "?"), []).append(run.data.metrics["val_loss"])
    return losses


def settled_results(uri: str, experiment: str, failed_too: bool = True) -> dict[str, float | None] | None:
    """Run hash -> validation loss of each finished grid point, and -> None for each failed one (when
    `failed_too`): what the adaptive planner places its points from. None when the store cannot be read."""
    runs = grid_point_runs(uri, experiment)
    if runs is None:
        return None
    results: dict[str, float | None] = {}
    for run in runs:
        run_hash, status = run.data.tags[HASH_TAG], run.info.status
        if status == FINISHED and "val_loss" in run.data.metrics:
            results[run_hash] = run.data.metrics["val_loss"]
        elif status == FAILED and failed_too:
            results.setdefault(run_hash, None)
    return results
