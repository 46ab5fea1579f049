"""Sweeps against an MLflow tracking server backed by PostgreSQL, as the README's cluster set-up runs them.

A throwaway PostgreSQL (initdb in a temporary folder, on a free port of 127.0.0.1) holds the runs; the
MLflow server in front of it stores artifacts under --artifacts-destination and serves them over HTTP,
so the trials need nothing but the server's URL. Skipped where PostgreSQL's binaries are not installed.
"""
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import TRAIN, assert_one_finished_run_per_point, start_sweep, write_sweep

from pipeline.data.synthetic import synthetic
from pipeline.errors import TrackingError
from pipeline.mlflow_keys import check_server
from pipeline.training.distributed import free_port
from pipeline.use.loading import load_from_mlflow

PG_USER, PG_PASSWORD, PG_DB = "mlflow", "isoflop-test", "mlflow"
FINAL_METRICS = ("val_loss", "val_stderr", "val_mc_stderr", "tokens_per_s", "seconds")
LOGGED_ONCE = ("val_loss", "val_stderr", "val_mc_stderr", "seconds")  # tokens_per_s is logged with every step too


def postgres_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and createdb: PATH first, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True)
                   if Path(p).parent.name.isdigit()]
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
            return folder
    return None


def as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) that runs PostgreSQL's tools: initdb refuses root, so root switches to `postgres`."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid
    pytest.skip("running as root and `runuser` is missing (needed to run PostgreSQL as `postgres`)")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class PostgresMlflow:
    """What the fixture started: the server's URL, the database URI behind it, and where things are."""

    def __init__(self, root: Path, uri: str, backend: str, artifacts: Path, log: Path):
        self.root, self.uri, self.backend, self.artifacts, self.log = root, uri, backend, artifacts, log


@pytest.fixture(scope="module")
def postgres_mlflow():
    """PostgreSQL on a free port of 127.0.0.1 with a database for MLflow, and `mlflow server` on it.

    Always stops both and removes the data folder at the end, whatever happened in between.
    """
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's binaries (initdb, pg_ctl, createdb) not found on PATH or in /usr/lib/postgresql/*/bin")
    prefix, uid, gid = as_postgres_user()
    # in /tmp, not pytest's tmp_path: the `postgres` user must be able to reach it, and root's pytest folders are 0700
    root = Path(tempfile.mkdtemp(prefix="isoflop-pg-"))
    data, socket_dir = root / "pgdata", root / "socket"
    pg_port, mlflow_port = free_port(), free_port()
    pg_env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
    server = None
    pg_started = False
    try:
        socket_dir.mkdir()
        (root / "pwfile").write_text(PG_PASSWORD + "\n")
        if uid is not None:
            for path in (root, socket_dir, root / "pwfile"):
                os.chown(path, uid, gid)
        run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={root / 'pwfile'}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"])
        options = (f"-c listen_addresses=127.0.0.1 -p {pg_port} -k {socket_dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")  # a throwaway: speed over safety
        pg_started = True
        run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", "60",
             "-o", options, "start"])
        run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", PG_USER, PG_DB], env=pg_env)
        backend = f"postgresql+psycopg://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{pg_port}/{PG_DB}"
        artifacts, log = root / "artifacts", root / "mlflow-server.log"
        with open(log, "w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                 "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                # isoflop uses none of the server's GenAI jobs: no job runner and its half-dozen consumer processes
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        uri = f"http://127.0.0.1:{mlflow_port}"
        deadline = time.time() + 180  # the first start creates MLflow's tables in PostgreSQL
        while True:
            try:
                check_server(uri, timeout=2)
                break
            except TrackingError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not come up on {uri}:\n{tail(log)}")
                time.sleep(1)
        yield PostgresMlflow(root, uri, backend, artifacts, log)
    finally:
        if server is not None:
            try:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        if pg_started:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60",
                            "stop"], check=False, capture_output=True, timeout=90)
        shutil.rmtree(root, ignore_errors=True)


def run_together(server: PostgresMlflow, *paths: Path) -> list[str]:
    """Start every sweep at once, wait for all; each must exit 0. Returns their outputs."""
    drivers = [start_sweep(path, env={"RAY_DEDUP_LOGS": "0"}) for path in paths]
    try:
        outputs = [driver.communicate(timeout=600)[0] for driver in drivers]
    finally:
        for driver in drivers:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    for path, driver, output in zip(paths, drivers, outputs):
        assert driver.returncode == 0, f"sweep {path}:\n{output[-4000:]}\nserver log:\n{tail(server.log)}"
    return outputs


def two_sweeps(tmp_path: Path, server: PostgresMlflow, name: str, a: dict, b: dict) -> list[Path]:
    """Sweep files a/NAME.yaml and b/NAME.yaml: one experiment, one prepared corpus, each its own Ray storage."""
    data = {"path": str(tmp_path / "data"), "synthetic": {"tokens": 200_000, "seed": 0}}
    if not (tmp_path / "data").exists():  # prepared once, as for a cluster, not raced by two drivers
        synthetic(tmp_path / "data", tokens=200_000, seed=0)
    train = {**TRAIN, "checkpoint_every": 0}  # not under test here; checkpoints cost seconds per point
    resources = {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2}
    paths = []
    for folder, grid in (("a", a), ("b", b)):
        (tmp_path / folder).mkdir(exist_ok=True)
        paths.append(write_sweep(tmp_path / folder, name=name, data=data, train=train, resources=resources,
                                 tracking_uri=server.uri, storage=str(tmp_path / folder / "ray"), **grid))
    return paths


def assert_finished_once(server: PostgresMlflow, experiment: str, points: int):
    """One FINISHED run per point, no loss step logged twice, the final metrics logged once, its artifacts."""
    client, runs = assert_one_finished_run_per_point(server.uri, experiment, points)
    for run in runs:
        assert set(FINAL_METRICS) <= set(run.data.metrics), run.info.run_name
        for key in LOGGED_ONCE:  # by one trainer's finish, not by each of two
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, (run.info.run_name, key)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied by the server
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "result.json"}
    return client, runs


@pytest.mark.slow
def test_two_concurrent_sweeps_on_a_postgres_backed_server_log_each_point_once(tmp_path, postgres_mlflow):
    """Sweep a (8 points, 2 trials at a time) and sweep b (4 points, 2 of them a's) start together on one
    experiment. b trains the shared points first, a reaches them last and finds them finished."""
    server = postgres_mlflow
    a, b = two_sweeps(tmp_path, server, "pg",
                      {"families": ["mdm", "arm"], "budgets": [2e9, 4e9], "models": ["cpu-26k", "cpu-51k"]},
                      {"families": ["mdm", "arm"], "budgets": [1e9, 2e9], "models": ["cpu-51k"]})
    outputs = run_together(server, a, b)
    assert "8 points" in outputs[0] and "4 points" in outputs[1]
    client, runs = assert_finished_once(server, "pg", 10)
    grid = {(r.data.params["family"], float(r.data.params["budget"]), r.data.params["model"]) for r in runs}
    assert grid == {(f, budget, model) for f in ("mdm", "arm") for budget, model in
                    ((2e9, "cpu-26k"), (4e9, "cpu-26k"), (1e9, "cpu-51k"), (2e9, "cpu-51k"), (4e9, "cpu-51k"))}
    # the artifacts come back over HTTP and are this run's, and they sit in the server's --artifacts-destination
    run = runs[0]
    local = Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path)))
    result = json.loads(local.read_text())["result"]
    assert result["run_hash"] == run.data.tags["isoflop.run_hash"]
    assert result["val_loss"] == pytest.approx(run.data.metrics["val_loss"])
    trained = load_from_mlflow(run.info.run_id, server.uri)  # the weights, from the run's logged model over HTTP
    assert trained.description["spec"]["family"] == run.data.params["family"]
    stored = list((server.artifacts / run.info.experiment_id).rglob("model.safetensors"))
    logged_models = [p for p in stored if "models" in p.relative_to(server.artifacts).parts]
    assert len(stored) == len(logged_models) == 10  # each run's weights once, in its logged model
    assert all(p.stat().st_size > 0 for p in stored)

