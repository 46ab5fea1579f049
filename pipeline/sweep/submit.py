"""Sweeps as Ray jobs: the sweep's driver runs on the cluster, so the shell or laptop that submitted it may go.

Ray's job server does the launching and keeps the logs; this module only names the job after its sweep,
refuses a second live job of the same sweep, and reads progress back (the job's state, its last progress
line, and the sweep's runs in MLflow).
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from pipeline.errors import SweepError
from pipeline.mlflow_keys import resolve_uri
from pipeline.sweep.grid import load_sweep
from pipeline.tracking import grid_point_runs

DEFAULT_JOB_SERVER = "http://127.0.0.1:8265"  # Ray's dashboard on the head node, as `ray job submit` uses it
SWEEP_KEY = "isoflop_sweep"                   # job metadata: the sweep a job runs
URI_KEY = "isoflop_tracking_uri"
LIVE = ("PENDING", "RUNNING")


def job_client(address: str | None):
    """Ray's JobSubmissionClient for `address`, else $RAY_ADDRESS, else the local head's dashboard."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_JOB_SERVER
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, no dashboard, ...
        raise SweepError(f"--address: no Ray job server answers at {address} ({str(err).splitlines()[0]}); "
                         "give the head node's dashboard address, e.g. http://<head-ip>:8265") from None


def sweep_jobs(client, name: str) -> list:
    """The jobs that ran or run sweep `name`, newest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(SWEEP_KEY) == name]
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def submit_sweep(path: str | Path, *, address: str | None, tracking_uri: str | None = None) -> int:
    """Check the sweep file here, then submit `isoflop sweep FILE` as a Ray job and return at once.

    The job runs in this folder's path on the head node, so the sweep file, its data and its storage must be
    at the same paths there (a shared filesystem, as a cluster's storage must be anyway).
    """
    path = Path(path).resolve()
    sweep = load_sweep(path)  # a bad file is refused before anything is submitted
    uri = resolve_uri(tracking_uri, sweep.tracking_uri)
    client = job_client(address)
    live = [j for j in sweep_jobs(client, sweep.name) if str(j.status) in LIVE]
    if live:
        raise SweepError(f"sweep {sweep.name}: already running as Ray job {live[0].submission_id} "
                         f"({live[0].status}); follow it with `isoflop status {sweep.name}` or "
                         f"`ray job logs {live[0].submission_id} --follow`")
    command = [sys.executable, "-m", "pipeline.cli", "sweep", str(path), "--tracking-uri", uri]
    job_id = client.submit_job(
        entrypoint=f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}",
        submission_id=f"isoflop-{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        metadata={SWEEP_KEY: sweep.name, URI_KEY: uri})
    print(f"sweep {sweep.name}: submitted as Ray job {job_id}; this shell may exit now.\n"
          f"  progress: isoflop status {sweep.name} --address {client.get_address()}\n"
          f"  logs:     ray job logs {job_id} --address {client.get_address()} --follow\n"
          f"  stop:     ray job stop {job_id} --address {client.get_address()}  (a later submit resumes it)")
    return 0


def sweep_status(name: str, *, address: str | None) -> int:
    """Print the sweep's jobs, the newest one's last progress line and its runs in MLflow; 1 if it has no job."""
    client = job_client(address)
    jobs = sweep_jobs(client, name)
    if not jobs:
        print(f"sweep {name}: no Ray job at {client.get_address()} ran it")
        return 1
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        print(f"job {job.submission_id}: {job.status} (started {started})")
    newest = jobs[0]
    marks = ("[sweep]", f"sweep {name}:")  # the driver's progress lines and its tallies (pipeline.sweep.driver)
    progress = [line[line.index(mark):] for line in client.get_job_logs(newest.submission_id).splitlines()
                for mark in marks if mark in line]
    if progress:
        print("last progress: " + progress[-1])
    print(run_counts(newest.metadata[URI_KEY], name))
    return 0


def run_counts(uri: str, experiment: str) -> str:
    """'runs in MLflow: 3 FINISHED, 1 RUNNING' for the experiment's grid points."""
    runs = grid_point_runs(uri, experiment)
    if runs is None:
        return f"runs in MLflow: unknown ({uri} cannot be read from here)"
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return "runs in MLflow: " + (", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none yet")
