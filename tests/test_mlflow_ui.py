"""What a user sees in MLflow's UI: experiments open on their training runs, the sweep's run describes the analysis,
`isoflop ui` names the pages to open, and stopping it stops every process it started."""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from analysis.cli import main as analyze
from analysis.synthetic import TRUTH, synthetic_runs
from helpers import log_study
from pipeline.errors import TrackingError
from pipeline.mlflow_keys import EXPERIMENT_KIND_TAG, NOTE_TAG, SWEEP_TAG, TRAINING_KIND, mark_training
from pipeline.tracking import prepare_store
from pipeline.training.distributed import free_port
from pipeline.ui import study_urls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kind(client: MlflowClient, name: str) -> str | None:
    return client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)


def test_sweep_experiments_are_tagged_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_store(uri, "fresh")
    client = MlflowClient(uri)
    assert kind(client, "fresh") == TRAINING_KIND
    # made before the tag, or guessed by the UI on a visit: the next sweep tags it
    client.create_experiment("older", artifact_location=(tmp_path / "a1").as_uri())
    client.create_experiment("guessed", artifact_location=(tmp_path / "a2").as_uri(),
                             tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    for name in ("older", "guessed", "fresh"):
        prepare_store(uri, name)
        assert kind(client, name) == TRAINING_KIND


class CountingClient:
    def __init__(self, fails: bool = False):
        self.writes, self.fails = 0, fails

    def set_experiment_tag(self, *_):
        self.writes += 1
        if self.fails:
            raise PermissionError("read-only store")


def test_tagging_writes_once_and_never_fails_on_a_store_that_refuses_it(tmp_path):
    class Experiment:
        experiment_id, tags = "1", {EXPERIMENT_KIND_TAG: TRAINING_KIND}

    done = CountingClient()
    mark_training(done, Experiment())
    assert done.writes == 0  # already tagged: nothing written
    Experiment.tags = {}
    refusing = CountingClient(fails=True)
    mark_training(refusing, Experiment())  # no exception
    assert refusing.writes == 1


def logged_study(uri: str, tmp_path) -> str:
    """An experiment as a sweep leaves it, without the kind tag: two families at three budgets; the parent's id."""
    rows = synthetic_runs(TRUTH, budgets=(1e19, 3e19, 1e20), sizes=5, seed=0).to_dict("records")
    return log_study(uri, tmp_path, "study", rows)[1]


def test_analyze_describes_the_sweep_run_and_tags_its_experiment(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = logged_study(uri, tmp_path)
    out = tmp_path / "out"
    assert analyze(["--experiment", "study", "--tracking-uri", uri, "--out", str(out), "--bootstrap", "10"]) == 0
    headline = next(line for line in capsys.readouterr().out.splitlines() if "compute to reach" in line)
    client = MlflowClient(uri)
    assert kind(client, "study") == TRAINING_KIND
    note = client.get_run(parent).data.tags[NOTE_TAG]
    assert headline in note.replace("**", "")  # the report's answer, as the command printed it
    assert "C = 6ND FLOPs" in note
    attached = {a.path.removeprefix("analysis/") for a in client.list_artifacts(parent, "analysis")}
    for name in ("isoflop_curves.png", "frontiers.png", "report.md"):
        assert f"`{name}`" in note and name in attached
    # the next analyze replaces it
    assert analyze(["--experiment", "study", "--tracking-uri", uri, "--out", str(out), "--bootstrap", "10",
                    "--gap-at", "2.5"]) == 0
    again = client.get_run(parent).data.tags[NOTE_TAG]
    assert again != note and "L = 2.5" in again


def test_ui_names_the_study_and_a_sweeps_run(tmp_path):
    base = "http://127.0.0.1:5000"
    missing = f"sqlite:///{tmp_path}/none.db"
    assert study_urls(missing, base)[0].startswith(f"{base} (the store")
    assert not (tmp_path / "none.db").exists()  # reading it did not create it
    assert "its own UI" in study_urls("http://127.0.0.1:1", base)[0]  # at once: no client retrying for minutes
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    ids = []
    for name in ("first", "second"):
        ids.append(client.create_experiment(name, artifact_location=(tmp_path / name).as_uri()))
        run = client.create_run(ids[-1], tags={SWEEP_TAG: name}).info.run_id
    client.create_experiment("not-a-sweep", artifact_location=(tmp_path / "other").as_uri())
    view = "?workflowType=machine_learning"  # MLflow 3.17's UI takes its training view from the URL, not the tag
    runs = f"/runs{view}&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"  # every run on a row of its own
    assert study_urls(uri, base) == [f"first: {base}/#/experiments/{ids[0]}{runs}",
                                     f"second: {base}/#/experiments/{ids[1]}{runs}"]
    assert study_urls(uri, base, "second") == [f"{base}/#/experiments/{ids[1]}/runs/{run}{view}"]
    with pytest.raises(TrackingError, match="no such experiment.*first, not-a-sweep, second"):
        study_urls(uri, base, "frist")
    client.delete_experiment(ids[1])
    assert study_urls(uri, base) == [f"{base}/#/experiments/{ids[0]}{runs}"]  # one study: its URL alone


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_the_whole_server_tree(tmp_path, sig):
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port),
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not answers(port):
            assert ui.poll() is None and time.monotonic() < deadline, "the UI did not start"
            time.sleep(0.5)
        children = psutil.Process(ui.pid).children(recursive=True)
        assert len(children) >= 2  # mlflow ui and uvicorn, at least
        ui.send_signal(sig)
        start = time.monotonic()
        while (alive(children) or not port_is_free(port)) and time.monotonic() - start < 5:
            time.sleep(0.1)
        took = time.monotonic() - start
        assert port_is_free(port) and not alive(children), f"left after {took:.1f} s: {alive(children)}"
        output = ui.communicate(timeout=5)[0]
        assert ui.returncode == 0 and "stopped the MLflow UI" in output and f"http://127.0.0.1:{port}" in output
    finally:
        if ui.poll() is None:
            ui.kill()
        for process in alive(locals().get("children", [])):
            process.kill()
