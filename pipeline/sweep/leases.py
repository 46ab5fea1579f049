"""Who trains a grid point right now: a lease on its MLflow run, so two sweeps never train one point at once.

Two sweeps may share points (an edited sweep re-run while the first still runs, two users on one store).
Finished points are skipped by their status; a point being trained is skipped by its lease, the tag
`isoflop.lease` = "HOST PID EXPIRY", which the trial holding it renews from a thread. A lease lapses at its
expiry, or at once when its holder's process has died on this host (a killed sweep's points resume at
once when it is re-run). MLflow has no compare-and-set, so taking a lease is write, settle, read back: of
trials that write within the settle time the last write wins, and each of them reads the same winner.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from pipeline.mlflow_keys import LEASE_TAG

LEASE_SECONDS = 120.0  # how long a holder that stopped renewing (its machine lost) keeps others waiting
SETTLE_SECONDS = 2.0   # longer than one trial's check-then-write, so a concurrent write lands before the read


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    expires: float

    @classmethod
    def parse(cls, text: str | None) -> Lease | None:
        try:
            host, pid, expires = (text or "").split()
            return cls(host, int(pid), float(expires))
        except ValueError:  # no lease, or one released ("")
            return None

    def __str__(self) -> str:
        return f"{self.host} {self.pid} {self.expires:.0f}"

    @property
    def live(self) -> bool:
        if time.time() > self.expires:
            return False
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)  # signal 0: does the holder still exist on this host?
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class PointClaim:
    """The lease of one run for this process; `take()` it before training, `release()` after."""

    def __init__(self, client: MlflowClient, run_id: str, lease_seconds: float = LEASE_SECONDS):
        self.client, self.run_id, self.lease_seconds = client, run_id, lease_seconds
        self.me = (socket.gethostname(), os.getpid())
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> Lease | None:
        """The live lease on the run, if any."""
        lease = Lease.parse(self.client.get_run(self.run_id).data.tags.get(LEASE_TAG))
        return lease if lease is not None and lease.live else None

    def take(self) -> bool:
        """True when this process now holds the lease (and renews it until released); False when another
        live trial holds it."""
        held = self.holder()
        if held is not None and (held.host, held.pid) != self.me:
            return False
        self._write()
        time.sleep(SETTLE_SECONDS)
        held = self.holder()
        if held is None or (held.host, held.pid) != self.me:
            return False
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.run_id}")
        self._renewer.start()
        return True

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self.client.set_tag(self.run_id, LEASE_TAG, "")

    def _write(self) -> None:
        self.client.set_tag(self.run_id, LEASE_TAG, str(Lease(*self.me, time.time() + self.lease_seconds)))

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self._write()
            except Exception:  # a tracking blip: the next renewal retries, well before the lease lapses
                pass
