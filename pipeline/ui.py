"""`isoflop ui`: MLflow's UI over the store in use, pointed at the study, and stopped whole by SIGTERM or SIGINT.

`mlflow ui` runs uvicorn and its workers (and, where enabled, MLflow's job runner) as processes of its own. They
are started in a process group of their own, so a signal to `isoflop ui` reaches every one of them through the
group, and no server is left holding the port after the command is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pipeline.errors import TrackingError
from pipeline.mlflow_keys import SWEEP_TAG, sqlite_store_missing

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_S = 3.0  # what uvicorn's workers get to close before the tree is killed


# MLflow 3.17's UI takes its view from its GenAI / Model training switch, set by this URL parameter or else by the
# browser's last choice (GenAI at first); the experiment's kind tag decides it only where that switch is off.
TRAINING_VIEW = "workflowType=machine_learning"
# The runs by name, every one on its own row (grouped by family), rather than the sweep's run alone with its
# points folded under it, which is what the default order by start time shows.
BY_NAME = "orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI's page of an experiment's runs, or of one run (routes of its single-page app), in its training view."""
    page = f"{base}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}?{TRAINING_VIEW}" if run_id else f"{page}?{TRAINING_VIEW}&{BY_NAME}"


def study_urls(uri: str, base: str, experiment: str | None = None) -> list[str]:
    """Where to look, one line each: with `experiment`, its sweep's parent run; else the runs view of each experiment
    holding an isoflop sweep ("name: URL" when there are several). A store that does not exist yet or cannot be read
    gives the UI's front page and why."""
    if sqlite_store_missing(uri):
        if experiment:
            raise TrackingError(f"--experiment {experiment}: {uri} does not exist yet (run a sweep first)")
        return [f"{base} (the store {uri} does not exist yet: it is created empty)"]
    if uri.startswith(("http://", "https://")):  # a server has a UI of its own; its client would retry for minutes
        return [f"{base} (the store is the server {uri}: its own UI is at that address)"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if experiment:
        return [_sweep_url(client, base, experiment)]
    try:
        parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     f"tags.`{SWEEP_TAG}` != ''", max_results=1000)
    except Exception as err:  # a store of another MLflow version, a server down, ...: the UI may still open
        return [f"{base} (could not read {uri}: {str(err).splitlines()[0]})"]
    ids = sorted({run.info.experiment_id for run in parents}, key=lambda i: (len(i), i))  # in order of creation
    if not ids:
        return [f"{base} (no isoflop sweep in {uri} yet)"]
    if len(ids) == 1:
        return [experiment_url(base, ids[0])]
    return [f"{client.get_experiment(i).name}: {experiment_url(base, i)}" for i in ids]


def _sweep_url(client, base: str, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"--experiment {experiment}: no such experiment (the store has {', '.join(names)})")
    parents = client.search_runs([found.experiment_id], f"tags.`{SWEEP_TAG}` != ''", max_results=1)
    if not parents:  # runs logged by other means: their list is the next best page
        return experiment_url(base, found.experiment_id)
    return experiment_url(base, found.experiment_id, parents[0].info.run_id)


def serve(uri: str, port: int, lines: list[str]) -> int:
    """Run `mlflow ui` until it exits or this process gets SIGTERM/SIGINT, which stop its whole process tree."""
    def stop(signum, _frame):
        raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    # isoflop uses none of MLflow's server-side jobs: their runner is half a dozen processes more to start and stop
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = None
    try:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port)], env=env, start_new_session=True)
        print("MLflow UI (Ctrl-C to stop):", *lines, sep="\n  ", flush=True)
        return server.wait()
    except _Stopped as stopped:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        took = stop_tree(server) if server else 0.0
        print(f"stopped the MLflow UI in {took:.1f} s ({signal.Signals(stopped.signum).name})", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server and server.poll() is None:  # an error on the way: no server outlives the command
            stop_tree(server)


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_tree(server: subprocess.Popen) -> float:
    """SIGTERM to the server's process group and to any descendant that left it, SIGKILL to what is left after
    GRACE_S; returns the seconds it took until none was left."""
    start = time.monotonic()
    try:
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_tree(server.pid, tree, sig)
        tree = _wait_gone(server, tree, GRACE_S)
        if not tree:
            break
    return time.monotonic() - start


def _wait_gone(server: subprocess.Popen, tree: list, timeout: float) -> list:
    """The processes of `tree` still running after at most `timeout` s; an exited one whose parent has not yet
    collected it (a zombie) runs nothing and holds no port, so it counts as gone."""
    deadline = time.monotonic() + timeout
    while True:
        server.poll()  # collects our own child as soon as it exits
        alive = [p for p in tree if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_tree(group: int, tree: list, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for process in tree:  # a descendant that started a session of its own is not in the group
        try:
            process.send_signal(sig)
        except Exception:  # noqa: BLE001 - already gone
            pass
