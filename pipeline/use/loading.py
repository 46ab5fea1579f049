"""Loading a finished model from wherever it is: a run folder, a folder `isoflop export` wrote, or an MLflow
run (its logged model, or its own artifacts for runs tracked before). Sampling, scoring, lm-eval and export
all start here.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.errors import RunFolderError
from pipeline.mlflow_keys import check_server, resolve_uri, sqlite_store_missing
from pipeline.training.run_folder import DESCRIPTION, RunFolder, TrainedModel, weights_name
from pipeline.use.export import is_export, load_export


def load_from_mlflow(run_id: str, tracking_uri: str, device: str | torch.device = "cpu") -> TrainedModel:
    """Download a run's weights and description and load them: from the run's logged model, or from the root of
    the run's own artifacts, where runs tracked before the weights went to the logged model alone keep them."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import logged_models

    if sqlite_store_missing(tracking_uri):
        raise RunFolderError(f"--tracking-uri: no MLflow database at {tracking_uri.removeprefix('sqlite:///')}")
    check_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
        models = [m for m in logged_models(client, run.info.experiment_id, run_id) if m.status == "READY"]
    except MlflowException as err:
        raise RunFolderError(f"--run {run_id}: not found in {tracking_uri} ({err.message.splitlines()[0]})") from None
    model = models[0] if models else None
    listing = client.list_logged_model_artifacts(model.model_id) if model else client.list_artifacts(run_id)
    present = {f.path for f in listing}
    weights = weights_name(present)
    missing = [name for name in (weights, DESCRIPTION) if name not in present]
    if missing:
        raise RunFolderError(f"--run {run_id}: no checkpoint (artifacts lack {', '.join(missing)}; "
                             "the run is unfinished, failed, or not a grid point)")
    with tempfile.TemporaryDirectory(prefix="isoflop-run-") as tmp, _no_progress_bars():
        for name in (weights, DESCRIPTION):
            if model:
                download_artifacts(f"{model.artifact_location}/{name}", dst_path=tmp, tracking_uri=tracking_uri)
            else:
                client.download_artifacts(run_id, name, tmp)
        return RunFolder(tmp).load(device, source=f"run {run_id}")


def load_trained(*, folder: str | Path | None = None, run: str | None = None, tracking_uri: str | None = None,
                 device: str | torch.device | None = None) -> TrainedModel:
    """A run folder, a folder `isoflop export` wrote, or an MLflow run id (tracking URI: the flag,
    $MLFLOW_TRACKING_URI, the default store)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (folder is None) == (run is None):
        raise RunFolderError("give exactly one of --checkpoint DIR or --run RUN_ID")
    if folder is not None:
        return load_export(folder, device) if is_export(folder) else RunFolder(folder).load(device)
    return load_from_mlflow(run, resolve_uri(tracking_uri), device)


@contextmanager
def _no_progress_bars():
    """Two small files: a download progress bar each is noise."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
