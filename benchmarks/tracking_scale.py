"""How the MLflow store grows with training, and how fast the runs table reads a large experiment.

1. Store bytes per 1,000 training steps, logged through the sweep's RunLogger into fresh sqlite stores: one
   row per step (what runs logged before log windows) against one row per window of log_every steps (the
   default 10, and the demo's 50), in this invocation. Target: the default at least 10x smaller.
2. `isoflop runs` (analysis.runs.from_mlflow, then the CSV) on a generated experiment of 1,000 finished
   grid-point runs, each with a sweep's params, tags, final metrics and a 100-window loss curve.
   Target: at most 10 s.
Usage: python benchmarks/tracking_scale.py [--runs 1000] [--steps 10000]
"""
from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from analysis.runs import from_mlflow, write_table
from pipeline import tracking
from pipeline.mlflow_keys import FINISHED, HASH_TAG
from pipeline.recipe import RunSpec, TrainConfig

SPEC = RunSpec(family="arm", shape="cpu-26k", budget=1e10, train=TrainConfig())


def store_bytes(path: Path) -> int:
    """The database's size with its write-ahead log folded in."""
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def bytes_per_1000_steps(folder: Path, steps: int, log_every: int) -> float:
    path = folder / f"every{log_every}.db"
    uri = f"sqlite:///{path}"
    logger = tracking.RunLogger(uri, tracking.prepare_store(uri, "scale"), SPEC)
    before = store_bytes(path)
    rows = [{"step": s, "loss": 3.0 + 1 / s, "lr": 1e-3, "tokens": s * 1024, "flops": s * 1e9, "tokens_per_s": 1e5}
            for s in range(log_every, steps + 1, log_every)]
    for start in range(0, len(rows), 100):  # as the trainer reports them, window by window
        logger.log_metrics(rows[start:start + 100])
    return (store_bytes(path) - before) * 1000 / steps


def generate_experiment(uri: str, runs: int) -> None:
    client = MlflowClient(uri)
    experiment = tracking.prepare_store(uri, "big")
    params = {f"train.key{k}": str(k) for k in range(40)}  # about as many params as a sweep's run has
    for i in range(runs):
        tags = [RunTag(HASH_TAG, f"{i:012x}"), RunTag("isoflop.variant", "")]
        run = client.create_run(experiment, run_name=f"point-{i}").info.run_id
        point = {"family": "arm" if i % 2 else "mdm", "budget": str(10.0 ** (9 + i % 4)), "params": str(1000 + i),
                 "tokens": str(10 ** 6 + i), "seed": "0", "epochs": "0.5", "flops_convention": "6ND", **params}
        curve = [Metric("loss", 3.0 + 1 / s, 0, s * 10) for s in range(1, 101)]
        final = [Metric(k, v, 0, 1000) for k, v in (("val_loss", 3.0 + i / runs), ("val_stderr", 0.03),
                                                    ("val_mc_stderr", 0.01))]
        client.log_batch(run, metrics=curve + final, params=[Param(k, v) for k, v in point.items()], tags=tags)
        client.set_terminated(run, FINISHED)
        if (i + 1) % 100 == 0:
            print(f"  generated {i + 1}/{runs} runs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_step = bytes_per_1000_steps(folder, args.steps, 1)
        print(f"store bytes per 1,000 steps: one row per step {per_step:,.0f}")
        for log_every in (10, 50):
            windows = bytes_per_1000_steps(folder, args.steps, log_every)
            print(f"  one row per {log_every}-step window {windows:,.0f}: ratio {per_step / windows:.1f}x smaller")
        uri = f"sqlite:///{folder}/big.db"
        started = time.perf_counter()
        generate_experiment(uri, args.runs)
        print(f"generated {args.runs} runs in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        table = from_mlflow("big", uri, finished_only=False)
        write_table(table, folder / "runs.csv")
        print(f"isoflop runs on {len(table)} runs: {time.perf_counter() - started:.2f} s (target <= 10 s)")


if __name__ == "__main__":
    main()
