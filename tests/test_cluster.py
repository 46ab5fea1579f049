"""A Ray cluster of two nodes on this machine, started the way users start one (`ray start`): a sweep whose
two-rank points span both nodes survives losing a node, and a sweep submitted as a Ray job outlives the
shell that submitted it. Slow (a cluster start, then real training), so run in CI with the other slow tests."""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from helpers import TRAIN, assert_one_finished_run_per_point, isoflop, larger_corpus, start_sweep, write_sweep

from pipeline.training.distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-cluster")]  # one cluster for both tests
RAY = str(Path(sys.executable).with_name("ray"))
# Every node and client of the cluster shares one token, as on a real cluster (Ray's token authentication)
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


class RayNodes:
    """A head and worker nodes, each a `ray start --block` process with 1 CPU; stopping a process stops its node."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.address = f"127.0.0.1:{free_port()}"
        self.job_server = f"http://127.0.0.1:{free_port()}"
        self.nodes: list[subprocess.Popen] = []
        self.start_node(head=True)

    def start_node(self, head: bool = False) -> subprocess.Popen:
        args = [RAY, "start", "--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
                "--disable-usage-stats"]
        if head:
            args += ["--head", f"--port={self.address.split(':')[1]}", "--node-ip-address=127.0.0.1",
                     f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.job_server.split(':')[2]}"]
        else:
            args += [f"--address={self.address}", "--node-ip-address=127.0.0.1"]
        log = open(self.logs / f"node{len(self.nodes)}.log", "w")
        self.nodes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, **AUTH}))
        self.wait_for_cpus(sum(node.poll() is None for node in self.nodes))
        return self.nodes[-1]

    def wait_for_cpus(self, cpus: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True,
                                    env={**os.environ, **AUTH})
            if re.search(rf"/{cpus}\.0 CPU", status.stdout):
                return
            time.sleep(2)
        self.stop()
        raise AssertionError(f"the cluster never reached {cpus} CPUs; logs in {self.logs}")

    def crash(self, node: subprocess.Popen) -> None:
        """What a crashed machine does to its node: SIGKILL its raylet (by pid), then every process under it, the
        workers included (left alone, a worker goes on training with its peers until it notices its raylet gone)."""
        processes = psutil.Process(node.pid).children(recursive=True)
        raylets = [p for p in processes if "raylet" in p.name()]
        assert raylets, "the node has no raylet process"
        for process in raylets + [p for p in processes if p not in raylets]:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        node.wait(timeout=60)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for process in psutil.Process(node.pid).children(recursive=True) + [psutil.Process(node.pid)]:
                    process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = RayNodes(tmp_path_factory.mktemp("ray-logs"))
    nodes.start_node()
    yield nodes
    nodes.stop()


def latest_checkpoint(storage: Path) -> int:
    tags = [int(p.read_text().strip().removeprefix("step")) for p in storage.glob("runs/*/checkpoints/latest")]
    return max(tags, default=0)


def test_lost_node_resumes_its_point_from_the_last_checkpoint(tmp_path, cluster):
    """Two-rank ZeRO-2 points on two one-CPU nodes: one rank per node. Crash the second node mid-run (its raylet,
    then its workers), start it again: Ray Train restarts the worker group from the point's last checkpoint."""
    train = {**TRAIN, "zero_stage": 2, "checkpoint_every": 20, "log_every": 10}
    path = write_sweep(tmp_path, name="nodes", families=["arm"], budgets=[1e10, 3e10], models=["cpu-26k"], train=train,
                       data=larger_corpus(tmp_path), resources={"workers_per_trial": 2, "cpus_per_worker": 1,
                                                                "max_failures": 2})
    driver = start_sweep(path, "--address", cluster.address, env=AUTH)
    deadline, killed = time.time() + 600, False
    while time.time() < deadline and driver.poll() is None and not killed:
        if latest_checkpoint(tmp_path / "ray"):
            cluster.crash(cluster.nodes[-1])
            killed = True
        time.sleep(0.5)
    assert killed, "no checkpoint was written before the sweep ended"
    time.sleep(5)  # a checkpoint being written as the node died is complete or never will be
    killed_at = latest_checkpoint(tmp_path / "ray")
    cluster.start_node()  # capacity returns
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-5000:]
    client, runs = assert_one_finished_run_per_point(f"sqlite:///{tmp_path}/mlflow.db", "nodes", 2)
    assert {r.data.params["world_size"] for r in runs} == {"2"}
    resumed = [r.data.tags.get("isoflop.resumed", "") for r in runs]
    # the first step after the restart is the last checkpointed one + 1 (steps are counted from 1)
    assert f"resumed at step {killed_at}" in resumed, (killed_at, resumed, output[-5000:])
    for run in runs:  # every log window is there once: nothing trained twice reached the curve
        steps, last = [m.step for m in client.get_metric_history(run.info.run_id, "loss")], int(run.data.params["steps"])
        assert steps == sorted(set(range(10, last, 10)) | {last}), steps


def test_sweep_submitted_as_a_ray_job(tmp_path, cluster):
    """`isoflop sweep --submit` returns while the job runs on the cluster; a second submit of the same sweep is
    refused while it runs; `isoflop status` follows it to the end, and each point has one finished run."""
    path = write_sweep(tmp_path, name="job", families=["arm"], budgets=[4e9, 8e9], models=["cpu-26k"])
    submit = isoflop("sweep", str(path), "--submit", "--address", cluster.job_server, timeout=120, env=AUTH)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted as Ray job (\S+);", submit.stdout).group(1)
    again = isoflop("sweep", str(path), "--submit", "--address", cluster.job_server, timeout=120, env=AUTH)
    assert again.returncode == 2 and f"already running as Ray job {job_id}" in again.stderr, again.stderr
    deadline = time.time() + 600
    while time.time() < deadline:
        status = isoflop("status", "job", "--address", cluster.job_server, timeout=120, env=AUTH)
        assert status.returncode == 0, status.stdout + status.stderr
        if re.search(rf"job {job_id}: (SUCCEEDED|FAILED|STOPPED)", status.stdout):
            break
        time.sleep(5)
    assert f"job {job_id}: SUCCEEDED" in status.stdout, status.stdout
    assert "last progress: sweep job: 2 trained, 0 diverged, 0 errored" in status.stdout, status.stdout
    assert "runs in MLflow: 2 FINISHED" in status.stdout, status.stdout
    assert_one_finished_run_per_point(f"sqlite:///{tmp_path}/mlflow.db", "job", 2)
    unknown = isoflop("status", "no-such-sweep", "--address", cluster.job_server, timeout=120, env=AUTH)
    assert unknown.returncode == 1 and "no Ray job" in unknown.stdout
