"""What many test modules share: one tiny recipe, the trained pair of tiny models, sweep files, the `isoflop`
command in a child process, an MLflow server, and the check that a sweep logged each point once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.data.synthetic import synthetic
from pipeline.errors import TrackingError
from pipeline.model.flops import budget_for_steps
from pipeline.model.shapes import resolve_shape
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.distributed import free_port

TRAIN = {"seq_len": 32, "batch_size": 8, "lr": 3e-3, "warmup_min_steps": 2, "min_steps": 10, "zero_stage": 0,
         "checkpoint_every": 10, "log_every": 5, "eval_samples": 2, "val_blocks": 4}


def larger_corpus(tmp_path: Path) -> dict:
    """Enough tokens for a cpu-26k point at 3e10 FLOPs (about 200k) to see each once."""
    return {"path": str(tmp_path / "data"), "synthetic": {"tokens": 400_000, "seed": 0}}


def write_sweep(tmp_path: Path, name: str = "mini", **overrides) -> Path:
    sweep = {"name": name, "data": {"path": str(tmp_path / "data"), "synthetic": {"tokens": 200_000, "seed": 0}},
             "families": ["mdm", "arm"], "budgets": [4e9, 8e9], "models": ["cpu-26k", "cpu-51k"], "seeds": [0],
             "train": TRAIN, "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
             "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage": str(tmp_path / "ray")}
    sweep.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def isoflop(*args, timeout=900, env=None, **kwargs):
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def start_sweep(path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`isoflop sweep PATH ARGS` as a child process that runs on while the test acts on it; stderr goes to stdout."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def child_runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`isoflop.run_hash` != ''", max_results=1000)
    return client, runs


def assert_one_finished_run_per_point(uri: str, experiment: str, points: int):
    client, runs = child_runs(uri, experiment)
    hashes = [r.data.tags["isoflop.run_hash"] for r in runs]
    assert len(hashes) == len(set(hashes)) == points
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and steps[-1] == int(run.data.params["steps"])  # no duplicated points
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
    # each final model once, as an MLflow logged model of its run holding the run's final files
    models = client.search_logged_models(experiment_ids=[runs[0].info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in runs)
    assert {m.status for m in models} == {"READY"}
    for model in models:  # the weights once per run: in its logged model, not among the run's artifacts too
        assert {f.path for f in client.list_logged_model_artifacts(model.model_id)} == {"model.safetensors", "result.json"}
        assert {a.path for a in client.list_artifacts(model.source_run_id)} == {"config.json", "result.json"}
    return client, runs


# The in-process counterpart of TRAIN, for models trained without a sweep (scoring, sampling, lm-eval tests)
TINY_RECIPE = TrainConfig(**{**TRAIN, "checkpoint_every": 0, "log_every": 50})
TINY_SHAPE = resolve_shape("{n_layer: 1, n_head: 2, d_model: 32}")


def train_tiny_models(root: Path, steps: int = 120) -> dict[str, Path]:
    """An MDM and an ARM of TINY_SHAPE trained `steps` steps on a 200k-token synthetic corpus: {family: run folder}."""
    from pipeline.training.loop import train

    data = synthetic(root / "data", tokens=200_000, seed=0).path
    budget = budget_for_steps(TINY_SHAPE, steps, batch_size=TINY_RECIPE.batch_size, seq_len=TINY_RECIPE.seq_len)
    for family in ("mdm", "arm"):
        train(RunSpec(family=family, shape=TINY_SHAPE, budget=budget, train=TINY_RECIPE), data, root / family,
              verbose=False)
    return {family: root / family for family in ("mdm", "arm")}


class MlflowServer:
    """`mlflow server` on a free port over a sqlite store in `folder`: stop() and start() again keep its data."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        from pipeline.mlflow_keys import check_server

        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: starts and stops in seconds
        for _ in range(240):
            try:
                check_server(self.uri, timeout=1)
                return
            except TrackingError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server at {self.uri} did not answer within 2 minutes")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: stop it the hard way
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def log_study(uri: str, tmp_path: Path, experiment: str, rows: list[dict], convention: str = "6ND",
              failed: int = 0) -> tuple[MlflowClient, str]:
    """An experiment as a sweep leaves it (made before the kind tag existed): a parent run and one child run per
    row (family, budget, params, tokens, loss), the first `failed` of them FAILED; returns (client, parent id)."""
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment, artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"isoflop.sweep": experiment}, run_name=f"sweep-{experiment}").info.run_id
    for i, row in enumerate(rows):
        run = client.create_run(exp, tags={"isoflop.run_hash": f"h{i}", "mlflow.parentRunId": parent}).info.run_id
        for key in ("family", "budget", "params", "tokens"):
            client.log_param(run, key, row[key])
        client.log_param(run, "flops_convention", convention)
        client.log_metric(run, "val_loss", row["loss"])
        client.set_terminated(run, "FAILED" if i < failed else "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return client, parent
