"""How a grid point appears in MLflow: the names the sweep writes and the analysis reads, and the default store.

Imports nothing of the project but its errors (nor MLflow), so the analysis package can share it without pulling
in training.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from pipeline.errors import TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default store
EARLIER_DEFAULT_URI = "sqlite:///mlruns.db"   # isoflop's default before it followed MLflow's

HASH_TAG = "isoflop.run_hash"          # on every grid point's run; the sweep's parent run has none
SWEEP_TAG = "isoflop.sweep"            # on the sweep's parent run
REASON_TAG = "isoflop.failure_reason"
RESUMED_TAG = "isoflop.resumed"
VARIANT_TAG = "isoflop.variant"        # which searched recipe values (e.g. lr=0.002) a run tried; "" when none
STABLE_TAG = "isoflop.ladder.stable"   # a ladder's stable run: its hash (it has no run_hash tag: not a grid point)
BRANCH_OF_TAG = "isoflop.ladder.branch_of"      # on a ladder's branch: the hash of the stable run it starts from
BRANCH_STEP_TAG = "isoflop.ladder.branch_step"  # ... and the step it starts at
LEASE_TAG = "isoflop.lease"            # "HOST PID EXPIRY" of the trial training the point now (pipeline/sweep/leases.py)
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"       # a run's description in MLflow's UI; `isoflop analyze` writes the sweep run's
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # which view MLflow 3's UI opens an experiment on
TRAINING_KIND = "custom_model_development"     # its model-training kind: the runs view, not the GenAI overview
EVAL_PREFIX = "eval/"                  # `isoflop eval` logs eval/<task>/<metric>; the runs table keeps these columns

FINISHED = "FINISHED"                  # MLflow's run statuses
FAILED = "FAILED"


def resolve_uri(uri: str | None = None, default: str = DEFAULT_TRACKING_URI) -> str:
    """The flag, else $MLFLOW_TRACKING_URI, else `default` (a sweep file's value); sqlite paths made absolute,
    so the sweep's Ray workers and a later `isoflop analyze` from another folder open the same file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default
    if uri == DEFAULT_TRACKING_URI and not _sqlite_file(uri).exists() and _sqlite_file(EARLIER_DEFAULT_URI).exists():
        # runs tracked under the earlier default stay findable where they are
        _say_once(f"tracking: using {_sqlite_file(EARLIER_DEFAULT_URI).resolve()}, the default store of earlier "
                  f"isoflop versions ({_sqlite_file(uri).name}, MLflow's default, does not exist here)")
        uri = EARLIER_DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(_sqlite_file(uri).resolve())
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a tracking server that does not answer, before a command spends anything: the MLflow
    client alone retries a refused connection for minutes. Stores that are not servers pass unchecked."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except OSError as err:
        raise TrackingError(f"tracking_uri: cannot reach {uri}: {getattr(err, 'reason', err)}") from None


@functools.cache
def _say_once(message: str) -> None:
    """A command may resolve the store several times; its reader needs the note once."""
    print(message, file=sys.stderr)


def sqlite_store_missing(uri: str) -> bool:
    """A sqlite store whose file does not exist yet: a reader answers "nothing there" rather than create it."""
    return uri.startswith("sqlite:///") and not _sqlite_file(uri).is_file()


def _sqlite_file(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def mark_training(client, experiment) -> None:
    """Tag an MLflow experiment (as `client.get_experiment_by_name` gives it) as model training, the kind MLflow 3's
    UI opens on its runs where its GenAI / Model training switch is off (3.17.2 has it on and takes the view from
    the URL: pipeline/ui.py); a kind the UI guessed on an earlier visit is replaced. Writes only when the tag
    differs, and a store that refuses the write (read-only, no permission) leaves the experiment as it was: the tag
    only decides the UI's first view."""
    if experiment.tags.get(EXPERIMENT_KIND_TAG) == TRAINING_KIND:
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    except Exception:  # noqa: BLE001 - never worth failing a sweep or an analysis over
        pass
