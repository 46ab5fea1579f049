"""Sweeps end to end on CPU with local Ray: grid, MLflow contents, idempotent re-runs, crashes, bad files."""
import json
import math
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import cli, write_word_jsonl
from helpers import (TRAIN, MlflowServer, assert_one_finished_run_per_point, child_runs, isoflop, larger_corpus,
                     start_sweep, write_sweep)
from mlflow.tracking import MlflowClient

from pipeline.data.synthetic import synthetic
from pipeline.errors import SweepError
from pipeline.sweep.grid import expand_grid, load_sweep


def test_dry_run_prints_grid_and_drops_short_points(tmp_path, capsys):
    path = write_sweep(tmp_path, budgets=[1e7, 4e9])
    code, out, err = cli(capsys, "sweep", path, "--dry-run")
    assert code == 0, err
    assert "dropped: mdm cpu-26k at 1e+07" in out and "below train.min_steps=10" in out
    assert out.count("cpu-51k") >= 2 and "4 runs" in out
    assert "losses measured so far: none" in out and not (tmp_path / "mlflow.db").exists()


def test_points_that_would_repeat_data_are_refused_before_anything_runs(tmp_path, capsys):
    """200k corpus tokens: cpu-26k at 1e11 FLOPs needs ~640k, over three epochs; said with field and value."""
    path = write_sweep(tmp_path, budgets=[4e9, 1e11])
    code, _, err = cli(capsys, "sweep", path)
    assert code == 2 and not (tmp_path / "ray").exists()  # nothing launched
    refused = [line for line in err.splitlines() if "train.max_epochs" in line]
    assert len(refused) == 4 and all("above train.max_epochs=1" in line for line in refused), err
    assert any("mdm cpu-26k at 1e+11 FLOPs" in line for line in refused)
    allowed = write_sweep(tmp_path, name="again", budgets=[4e9, 1e11], train={**TRAIN, "max_epochs": 20})
    code, out, err = cli(capsys, "sweep", allowed, "--dry-run")
    assert code == 0, err
    epochs = [float(line.split()[-3]) for line in out.splitlines()  # the columns end: epochs, eval/C, spent/C
              if line.startswith(("mdm", "arm"))]
    assert len(epochs) == 8 and max(epochs) > 1 and min(epochs) < 0.5


def test_dry_run_warns_where_a_budget_is_not_iso_in_spent_compute(tmp_path, capsys):
    """At vocab 512 the LM head is most of a tiny model's compute: under 6ND, cpu-0.3k spends 2.5x what cpu-2k does."""
    grid = dict(families=["arm"], budgets=[3e9], models=["cpu-0.3k", "cpu-2k"], train={**TRAIN, "max_epochs": 20})
    code, out, err = cli(capsys, "sweep", write_sweep(tmp_path, **grid), "--dry-run")
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "arm at 3e+09 is not iso in spent compute" in warnings[0], out
    assert "(cpu-2k) to" in warnings[0] and "(cpu-0.3k) under flops_convention=6ND" in warnings[0]
    assert "flops_convention: spent counts what each size spends" in warnings[0]
    code, out, err = cli(capsys, "sweep", write_sweep(tmp_path, name="spent", flops_convention="spent", **grid),
                         "--dry-run")
    assert code == 0 and "warning:" not in out, out + err
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("arm")] == ["1.00", "1.00"]


def test_paper_sweep_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # the file's data path is relative to the repository
    code, out, err = cli(capsys, "sweep", "sweeps/smdm_paper.yaml", "--dry-run")
    assert code == 0, err
    for budget in ("6e+18", "1e+19", "3e+19", "6e+19", "1e+20"):
        assert budget in out
    assert "smdm-" in out and "70 runs" in out
    assert "epochs" in out  # unknown ("?") until the corpus is prepared


def test_bad_sweep_file_reports_every_problem_at_once(tmp_path, capsys):
    path = write_sweep(tmp_path, families=["mdm", "xrm"], budgets=[1e9, -3, "lots"], models=["cpu-26k", "cpu-3k"],
                       trian={"lr": 1}, tracking_uri="http://127.0.0.1:9")
    code, _, err = cli(capsys, "sweep", path)
    assert code == 2
    for expected in ("families.1", "'xrm'", "budgets", "unknown shape 'cpu-3k'", "trian: unknown key (did you mean 'train'?)"):
        assert expected in err, err


def test_bad_data_resources_and_tracking_reported_together(tmp_path, capsys):
    path = write_sweep(tmp_path, data={"path": str(tmp_path / "missing")}, tracking_uri="http://127.0.0.1:9",
                       resources={"workers_per_trial": 64, "cpus_per_worker": 4})
    code, _, err = cli(capsys, "sweep", path)
    assert code == 2
    for expected in (str(tmp_path / "missing"), "resources: a trial needs 64 workers", "tracking_uri: cannot reach"):
        assert expected in err, err


def test_duplicated_points_are_an_error(tmp_path):
    path = write_sweep(tmp_path, models=["cpu-26k", {"n_layer": 1, "n_head": 2, "d_model": 40, "d_ff": 160}])
    with pytest.raises(SweepError, match="duplicated grid point"):
        expand_grid(load_sweep(path), vocab_size=300)


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
                "zero_stage", "world_size", "seed", "data_fingerprint", "git_commit", "run_hash", "train.lr",
                "flops_spent"):
        assert key in params, key
    assert float(params["flops_spent"]) > float(params["flops"])  # 6ND misses the head and attention
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
        driver = start_sweep(path)
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
    driver = start_sweep(path)
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
    driver = start_sweep(path)
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


STEP_LINE = re.compile(r"step \d+/\d+")


@pytest.fixture(scope="session")  # not per module: under xdist another module's tests may run between its two readers
def one_trains_one_diverges(tmp_path_factory):
    """A finished sweep of two variants of one point (lr searched): one trains, one diverges: (folder, file, output)."""
    tmp_path = tmp_path_factory.mktemp("calm")
    path = write_sweep(tmp_path, name="calm", families=["arm"], budgets=[4e9], models=["cpu-26k"],
                       train={**TRAIN, "lr": [3e-3, 1e6], "grad_clip": 0.0})
    return tmp_path, path, isoflop("sweep", str(path), timeout=300)


@pytest.mark.slow
@pytest.mark.xdist_group("one-trains-one-diverges")  # the two tests read one sweep: run it once
def test_sweep_output_is_calm_and_each_point_logs_to_its_file(one_trains_one_diverges):
    """The driver's output (not a terminal) has `[sweep]` lines and no step lines; each point's steps are in its
    log file, whose path is printed for the one that failed."""
    tmp_path, _, proc = one_trains_one_diverges
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # the diverged point fails the sweep
    assert "[sweep]" in proc.stdout and "1 trained, 1 diverged" in proc.stdout, output[-3000:]
    assert not STEP_LINE.search(output) and "repeated" not in output and "Configuration for experiment" not in output
    logs = sorted((tmp_path / "ray" / "logs").glob("*.log"))
    assert len(logs) == 2
    texts = {log: log.read_text() for log in logs}
    trained = [log for log, text in texts.items() if "step 101/101" in text]
    assert len(trained) == 1 and len(STEP_LINE.findall(texts[trained[0]])) == 21  # 101 steps: 20 windows of 5, then the last
    diverged = next(log for log in logs if log not in trained)
    assert f"; its log: {diverged}" in proc.stdout
    assert Path(diverged).name.startswith("arm-cpu-26k-4.00e+09-")


@pytest.mark.slow
@pytest.mark.xdist_group("one-trains-one-diverges")
def test_diverged_point_is_marked_failed_and_not_retried(one_trains_one_diverges, capsys):
    tmp_path, path, _ = one_trains_one_diverges
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, runs = child_runs(uri, "calm")
    diverged = [r for r in runs if r.info.status == "FAILED"]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert diverged[0].data.tags["isoflop.failure_reason"].startswith("diverged")
    client = MlflowClient(uri)
    assert client.get_run(diverged[0].data.tags["mlflow.parentRunId"]).info.status == "FAILED"  # the sweep's run too
    assert list((tmp_path / "ray").glob(f"calm-*/{diverged[0].info.run_name}"))  # Tune's trial folder, by run name
    code, out, _ = cli(capsys, "sweep", path)  # nothing left to run: no Ray start, so in this process
    assert code == 1 and "1 finished, 1 failed" in out and "0 to run" in out
    assert len(child_runs(uri, "calm")[1]) == 2


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
    drivers = [start_sweep(p) for p in sweeps]
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
    drivers = [start_sweep(p) for p in sweeps]
    outputs = [d.communicate(timeout=900)[0] for d in drivers]
    for driver, output in zip(drivers, outputs):
        assert driver.returncode == 0, output[-3000:]
    client, runs = assert_one_finished_run_per_point(uri, "same", 1)
    assert len(client.get_metric_history(runs[0].info.run_id, "val_loss")) == 1
    said = " ".join(outputs)
    assert "1 trained" in said and ("1 finished by another sweep meanwhile" in said or "0 to run" in said), said[-3000:]
