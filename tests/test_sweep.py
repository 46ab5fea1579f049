"""Sweeps end to end on CPU with local Ray: grid, MLflow contents, idempotent re-runs, crashes, bad files."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import write_word_jsonl
from mlflow.tracking import MlflowClient

from pipeline.data.synthetic import synthetic
from pipeline.errors import SweepError, TrackingError
from pipeline.sweep.grid import expand_grid, load_sweep
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


def test_dry_run_prints_grid_and_drops_short_points(tmp_path):
    path = write_sweep(tmp_path, budgets=[1e7, 4e9])
    proc = isoflop("sweep", str(path), "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dropped: mdm cpu-26k at 1e+07" in proc.stdout and "below train.min_steps=10" in proc.stdout
    assert proc.stdout.count("cpu-51k") >= 2 and "4 runs" in proc.stdout
    assert "losses measured so far: none" in proc.stdout and not (tmp_path / "mlflow.db").exists()


def test_points_that_would_repeat_data_are_refused_before_anything_runs(tmp_path):
    """200k corpus tokens: cpu-26k at 1e11 FLOPs needs ~640k, over three epochs; said with field and value."""
    path = write_sweep(tmp_path, budgets=[4e9, 1e11])
    proc = isoflop("sweep", str(path), timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "ray").exists()  # nothing launched
    refused = [line for line in proc.stderr.splitlines() if "train.max_epochs" in line]
    assert len(refused) == 4 and all("above train.max_epochs=1" in line for line in refused), proc.stderr
    assert any("mdm cpu-26k at 1e+11 FLOPs" in line for line in refused)
    allowed = write_sweep(tmp_path, name="again", budgets=[4e9, 1e11], train={**TRAIN, "max_epochs": 20})
    proc = isoflop("sweep", str(allowed), "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    epochs = [float(line.split()[-2]) for line in proc.stdout.splitlines()  # the columns end: epochs, eval/C
              if line.startswith(("mdm", "arm"))]
    assert len(epochs) == 8 and max(epochs) > 1 and min(epochs) < 0.5


def test_paper_sweep_dry_run():
    proc = isoflop("sweep", "sweeps/smdm_paper.yaml", "--dry-run", timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    for budget in ("6e+18", "1e+19", "3e+19", "6e+19", "1e+20"):
        assert budget in proc.stdout
    assert "smdm-" in proc.stdout and "70 runs" in proc.stdout
    assert "epochs" in proc.stdout  # unknown ("?") until the corpus is prepared


def test_bad_sweep_file_reports_every_problem_at_once(tmp_path):
    path = write_sweep(tmp_path, families=["mdm", "xrm"], budgets=[1e9, -3, "lots"], models=["cpu-26k", "cpu-3k"],
                       trian={"lr": 1}, tracking_uri="http://127.0.0.1:9")
    proc = isoflop("sweep", str(path), timeout=120)
    assert proc.returncode == 2
    for expected in ("families.1", "'xrm'", "budgets", "unknown shape 'cpu-3k'", "trian: unknown key (did you mean 'train'?)"):
        assert expected in proc.stderr, proc.stderr


def test_bad_data_resources_and_tracking_reported_together(tmp_path):
    path = write_sweep(tmp_path, data={"path": str(tmp_path / "missing")}, tracking_uri="http://127.0.0.1:9",
                       resources={"workers_per_trial": 64, "cpus_per_worker": 4})
    proc = isoflop("sweep", str(path), timeout=120)
    assert proc.returncode == 2
    for expected in (str(tmp_path / "missing"), "resources: a trial needs 64 workers", "tracking_uri: cannot reach"):
        assert expected in proc.stderr, proc.stderr


def test_duplicated_points_are_an_error(tmp_path):
    path = write_sweep(tmp_path, models=["cpu-26k", {"n_layer": 1, "n_head": 2, "d_model": 40, "d_ff": 160}])
    with pytest.raises(SweepError, match="duplicated grid point"):
        expand_grid(load_sweep(path), vocab_size=300)


class MlflowServer:
    """`mlflow server` on a free port over a sqlite store in `folder`: stop() and start() again keep its data."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        from pipeline.tracking import check_server

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


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server.uri
    server.stop()


@pytest.mark.slow
def test_sweep_over_http_logs_every_point_once_and_reruns_nothing(tmp_path, mlflow_server):
    path = write_sweep(tmp_path, name="mini-http", tracking_uri=mlflow_server)
    proc = isoflop("sweep", str(path), env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})  # runs last seconds
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sweep]" in proc.stdout and "ETA" in proc.stdout
    client, runs = assert_one_finished_run_per_point(mlflow_server, "mini-http", 8)
    run = runs[0]
    params = run.data.params
    for key in ("family", "budget", "model", "params", "tokens", "steps", "tokens_per_param", "flops_convention",
                "zero_stage", "world_size", "seed", "data_fingerprint", "git_commit", "run_hash", "train.lr"):
        assert key in params, key
    assert {"loss", "lr", "tokens", "flops", "tokens_per_s", "val_loss"} <= set(run.data.metrics)
    assert any("system/cpu_utilization_percentage" in r.data.metrics for r in runs)  # MLflow's own monitor
    assert run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["mlflow.source.name"] == "isoflop sweep mini-http" and run.data.tags["mlflow.user"]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])  # the sweep's run: ended, with its file and grid
    assert parent.info.status == "FINISHED" and parent.data.tags["isoflop.sweep"] == "mini-http"
    assert {"mini-http.yaml", "grid.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    again = isoflop("sweep", str(path))
    assert again.returncode == 0 and "8 finished" in again.stdout and "0 to run" in again.stdout
    assert_one_finished_run_per_point(mlflow_server, "mini-http", 8)


@pytest.mark.slow
def test_sweep_rides_out_a_tracking_server_restart(tmp_path):
    """The MLflow server dies mid-sweep and comes back on the same port: MLflow's client retries, trials go on
    training, and every point ends with one finished run whose curve holds each step once."""
    server = MlflowServer(tmp_path)
    try:
        path = write_sweep(tmp_path, name="mini-blip", families=["arm"], budgets=[8e9, 3e10], tracking_uri=server.uri,
                           data=larger_corpus(tmp_path))
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and not list((tmp_path / "ray").glob("runs/*/checkpoints")):
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep ended before the server could be stopped"
        server.stop(signal.SIGKILL)
        time.sleep(10)
        server.start()
        output, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, output[-4000:]
        assert_one_finished_run_per_point(server.uri, "mini-blip", 4)
    finally:
        server.stop()


@pytest.mark.slow
def test_sigkilled_driver_loses_nothing_on_rerun(tmp_path):
    # The two larger points start first and differ 2x in length, so the longer is mid-run (about 1,500 of 3,000
    # steps) when the other finishes: on a fast machine a shorter one ends before Ray has stopped it. It reads
    # its corpus twice over (max_epochs), which changes nothing in what this test checks.
    train = {**TRAIN, "checkpoint_every": 20, "max_epochs": 4}
    path = write_sweep(tmp_path, name="mini-kill", families=["mdm"], budgets=[4e9, 1.2e11], train=train,
                       data=larger_corpus(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    # wait until one point has finished and an unfinished one has written a checkpoint, then kill the driver
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        # read MLflow only once a checkpoint shows the driver has long since created the store
        checkpointed = {p.parents[1].name for p in (tmp_path / "ray").glob("runs/*/checkpoints/latest")}
        if checkpointed:
            _, runs = child_runs(uri, "mini-kill")
            finished = {r.data.tags["isoflop.run_hash"] for r in runs if r.info.status == "FINISHED"}
            if finished and checkpointed - finished:
                break
        time.sleep(1)
    assert driver.poll() is None, "the sweep ended before it could be interrupted:\n" + driver.communicate()[0][-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(5)  # a trial already past its last step may still record its finish as Ray winds down
    _, before = child_runs(uri, "mini-kill")
    done_before = {r.data.tags["isoflop.run_hash"]: r.info.run_id for r in before if r.info.status == "FINISHED"}
    assert done_before and len(done_before) < 4
    proc = isoflop("sweep", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{len(done_before)} finished" in proc.stdout
    client, runs = assert_one_finished_run_per_point(uri, "mini-kill", 4)
    for run in runs:  # finished points were not retrained: same run, same end time
        if run.data.tags["isoflop.run_hash"] in done_before:
            assert run.info.run_id == done_before[run.data.tags["isoflop.run_hash"]]
    resumed = [r for r in runs if "resumed at step" in (r.data.tags.get("isoflop.resumed") or "")]
    assert resumed, "the interrupted point should continue from its checkpoint, not step 0"
    assert client.get_run(runs[0].data.tags["mlflow.parentRunId"]).info.status == "FINISHED"  # reopened, then ended


def train_workers_of(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train workers this driver started (its local Ray is its child), never another sweep's on the machine."""
    found = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_killed_worker_is_restarted_from_its_checkpoint(tmp_path):
    """A two-rank ZeRO-2 point under Ray Train: SIGKILL one rank mid-run; Train's FailureConfig restarts the group."""
    train = {**TRAIN, "zero_stage": 2, "checkpoint_every": 20, "log_every": 10}
    path = write_sweep(tmp_path, name="mini-worker", families=["arm"], budgets=[3e10], models=["cpu-26k"], train=train,
                       data=larger_corpus(tmp_path),
                       resources={"workers_per_trial": 2, "cpus_per_worker": 1, "max_failures": 2})
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killed = False
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and not killed:
        if list((tmp_path / "ray").glob("runs/*/checkpoints/latest")):
            workers = train_workers_of(driver.pid)
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                killed = True
        time.sleep(0.5)
    output, _ = driver.communicate(timeout=600)
    assert killed, "no checkpoint was written before the run ended"
    assert driver.returncode == 0, output[-4000:]
    _, runs = assert_one_finished_run_per_point(f"sqlite:///{tmp_path}/mlflow.db", "mini-worker", 1)
    assert runs[0].data.params["world_size"] == "2"
    assert "resumed at step" in runs[0].data.tags.get("isoflop.resumed", "")


@pytest.mark.slow
def test_diverged_point_is_marked_failed_and_not_retried(tmp_path):
    train = {**TRAIN, "lr": 1e6, "grad_clip": 0.0}
    path = write_sweep(tmp_path, name="mini-nan", families=["arm"], budgets=[4e9], models=["cpu-26k"], train=train)
    first = isoflop("sweep", str(path))
    assert first.returncode == 1 and "1 diverged" in first.stdout, first.stdout[-3000:]
    _, runs = child_runs(f"sqlite:///{tmp_path}/mlflow.db", "mini-nan")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["isoflop.failure_reason"].startswith("diverged")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(runs[0].data.tags["mlflow.parentRunId"]).info.status == "FAILED"  # the sweep's run too
    assert list((tmp_path / "ray").glob(f"mini-nan-*/{runs[0].info.run_name}"))  # Tune's trial folder, by run name
    again = isoflop("sweep", str(path))
    assert again.returncode == 1 and "1 failed" in again.stdout and "0 to run" in again.stdout
    assert len(child_runs(f"sqlite:///{tmp_path}/mlflow.db", "mini-nan")[1]) == 1


def test_sizes_rule_brackets_the_predicted_optimum(tmp_path):
    path = write_sweep(tmp_path, models=None, sizes={"per_budget": 5, "span": 16, "tokens_per_param": 65},
                       budgets=[1e11, 1e12])
    sweep = load_sweep(path)
    points, dropped = expand_grid(sweep, vocab_size=512)
    for budget in (1e11, 1e12):
        sizes = sorted({p.spec.shape.non_embedding_params() for p in points if p.spec.budget == budget})
        centre = (budget / (6 * 65)) ** 0.5
        assert len(sizes) >= 4 and sizes[0] < centre < sizes[-1]
        assert sizes[-1] / sizes[0] <= 16 * 2.5  # the ladder is coarse: a target may round to a neighbour
    per_family = load_sweep(write_sweep(tmp_path, name="fam", models=None, budgets=[1e12],
                                        sizes={"per_budget": 5, "span": 8, "tokens_per_param": {"arm": 100, "mdm": 900}}))
    points, _ = expand_grid(per_family, vocab_size=512)
    largest = {f: max(p.spec.shape.non_embedding_params() for p in points if p.spec.family == f) for f in ("arm", "mdm")}
    assert largest["mdm"] < largest["arm"]  # the MDM's window sits at smaller N
    with pytest.raises(SweepError, match="exactly one of `models`"):
        load_sweep(write_sweep(tmp_path, name="both", sizes={"per_budget": 3}))
    with pytest.raises(SweepError, match="storage must be a filesystem path"):
        load_sweep(write_sweep(tmp_path, name="s3", storage="s3://bucket/x"))


def test_budgets_per_family(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, budgets={"arm": [4e9], "mdm": [8e9, 1.6e10]}))
    points, _ = expand_grid(sweep, vocab_size=512)
    budgets = {f: sorted({p.spec.budget for p in points if p.spec.family == f}) for f in ("arm", "mdm")}
    assert budgets == {"arm": [4e9], "mdm": [8e9, 1.6e10]}
    # a list still serves every family, and the hashes of its points do not depend on how budgets were written
    as_list = load_sweep(write_sweep(tmp_path, name="list", budgets=[4e9]))
    as_map = load_sweep(write_sweep(tmp_path, name="map", budgets={"arm": [4e9], "mdm": [4e9]}))
    assert ({p.spec.run_hash for p in expand_grid(as_list, 512)[0]}
            == {p.spec.run_hash for p in expand_grid(as_map, 512)[0]})
    for budgets, message in (({"arm": [4e9], "mdm": [4e9], "xdm": [1e9]}, "budgets: 'xdm' is not one of"),
                             ({"arm": [4e9]}, "no budgets for family 'mdm'"),
                             ({"arm": [4e9], "mdm": []}, "budgets.mdm is empty"),
                             ({"arm": [4e9], "mdm": [-1.0]}, r"budgets.mdm must be positive finite FLOP counts, got \[-1.0\]")):
        with pytest.raises(SweepError, match=message):
            load_sweep(write_sweep(tmp_path, name="bad", budgets=budgets))
    with pytest.raises(SweepError, match=r"train.max_epochs: Input should be greater than 0 \(got 0\)"):
        load_sweep(write_sweep(tmp_path, name="bad", train={**TRAIN, "max_epochs": 0}))


@pytest.mark.slow
def test_two_sweeps_share_one_store_and_a_prepared_corpus_works(tmp_path):
    """Two drivers start at once on one fresh sqlite store; one trains on a corpus from `isoflop data prepare`."""
    docs = write_word_jsonl(tmp_path / "docs.jsonl", 2000)
    prepared = isoflop("data", "prepare", str(docs), "--out", str(tmp_path / "text"),
                       "--tokenizer", "bpe:300", timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    uri = f"sqlite:///{tmp_path}/shared.db"
    common = dict(budgets=[4e9], models=["cpu-26k", "cpu-51k"], tracking_uri=uri)
    sweeps = [write_sweep(tmp_path, name="text", families=["arm"], data=str(tmp_path / "text"), **common),
              write_sweep(tmp_path, name="synth", families=["mdm"], **common)]
    drivers = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(p)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for p in sweeps]
    outputs = [d.communicate(timeout=900)[0] for d in drivers]
    for driver, output in zip(drivers, outputs):
        assert driver.returncode == 0, output[-3000:]
    for name, data in (("text", tmp_path / "text"), ("synth", tmp_path / "data")):
        _, runs = assert_one_finished_run_per_point(uri, name, 2)
        meta = json.loads((data / "meta.json").read_text())
        assert {r.data.params["data_fingerprint"] for r in runs} == {meta["fingerprint"]}
        assert all(r.data.metrics["val_loss"] < math.log(meta["vocab_size"]) for r in runs)  # learnt something


def test_dry_run_names_the_losses_each_family_reached():
    from pipeline.sweep.plan import format_loss_ranges
    both = format_loss_ranges({"mdm": [3.5, 3.1], "arm": [2.9, 3.3, 3.6]})
    assert "arm 2.9-3.6 (3 runs), mdm 3.1-3.5 (2 runs); overlap 3.1-3.5" in both
    assert format_loss_ranges({"mdm": [3.5], "arm": [2.9]}).endswith("no overlap")
    assert "none" in format_loss_ranges({}) and "unknown" in format_loss_ranges(None)


@pytest.mark.slow
def test_two_sweeps_started_together_on_one_point_train_it_once(tmp_path):
    """Both drivers plan the point as not finished; the trial that takes its lease trains it, the other waits,
    sees it finished and skips it: one run, every step logged once, the final metrics once."""
    synthetic(tmp_path / "data", tokens=200_000, seed=0)  # prepared once, not raced by the two drivers
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweeps = []
    for side in ("a", "b"):  # one experiment, each driver its own sweep file and Ray storage
        (tmp_path / side).mkdir()
        sweeps.append(write_sweep(tmp_path / side, name="same", families=["arm"], budgets=[8e9], models=["cpu-26k"],
                                  data=str(tmp_path / "data"), tracking_uri=uri, storage=str(tmp_path / side / "ray")))
    drivers = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(p)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for p in sweeps]
    outputs = [d.communicate(timeout=900)[0] for d in drivers]
    for driver, output in zip(drivers, outputs):
        assert driver.returncode == 0, output[-3000:]
    client, runs = assert_one_finished_run_per_point(uri, "same", 1)
    assert len(client.get_metric_history(runs[0].info.run_id, "val_loss")) == 1
    said = " ".join(outputs)
    assert "1 trained" in said and ("1 finished by another sweep meanwhile" in said or "0 to run" in said), said[-3000:]
