"""The lease that keeps two sweeps from training one grid point at once (pipeline/sweep/leases.py)."""
import os
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.mlflow_keys import LEASE_TAG
from pipeline.sweep import leases
from pipeline.sweep.leases import Lease, PointClaim


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('claims')}/mlflow.db")  # made once: seconds
    return client, client.create_experiment("claims")


@pytest.fixture
def run(store, monkeypatch):
    monkeypatch.setattr(leases, "SETTLE_SECONDS", 0.0)
    client, experiment = store
    return client, client.create_run(experiment).info.run_id


def hold(client, run_id, host=None, pid=1, expires_in=60.0):
    client.set_tag(run_id, LEASE_TAG, str(Lease(host or socket.gethostname(), pid, time.time() + expires_in)))


def test_a_live_lease_of_another_process_keeps_the_point(run):
    client, run_id = run
    hold(client, run_id, pid=1)  # pid 1 always exists: a live holder on this host
    assert not PointClaim(client, run_id).take()
    hold(client, run_id, host="another-node")  # on another host liveness is the expiry alone
    assert not PointClaim(client, run_id).take()


@pytest.mark.parametrize("why", ["expired", "holder died", "released"])
def test_a_lapsed_lease_is_taken_renewed_and_released(run, why):
    client, run_id = run
    if why == "expired":
        hold(client, run_id, host="another-node", expires_in=-1)
    elif why == "holder died":
        dead = os.fork()
        if dead == 0:
            os._exit(0)
        os.waitpid(dead, 0)
        hold(client, run_id, pid=dead)
    else:
        client.set_tag(run_id, LEASE_TAG, "")
    mine = PointClaim(client, run_id, lease_seconds=4.0)
    assert mine.take()
    first = Lease.parse(client.get_run(run_id).data.tags[LEASE_TAG])
    assert (first.host, first.pid) == (socket.gethostname(), os.getpid())
    time.sleep(1.5)  # renewed every lease_seconds / 4
    assert Lease.parse(client.get_run(run_id).data.tags[LEASE_TAG]).expires > first.expires
    mine.release()
    assert client.get_run(run_id).data.tags[LEASE_TAG] == "" and mine.holder() is None
