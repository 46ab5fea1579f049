"""Orchestration overhead of a sweep: wall time against the training time inside its runs.

overhead = 1 - (sum of in-run training seconds / concurrent trials) / sweep wall time, and the fixed
cost per trial = (wall - training / concurrency) * concurrency / trials. It runs the sweep twice in
this invocation, each into a fresh store: one-worker points in a Ray Train worker group (the general
path) and in the Tune trial itself (the default), so the ratio of the two is measured side by side.
Target: overhead <= 15% of wall time on the demo sweep.
Usage: python benchmarks/sweep_overhead.py [--sweep sweeps/demo.yaml] [--only default]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from pipeline.sweep.driver import run_sweep
from pipeline.sweep.plan import trials_that_fit
from pipeline.sweep.schema import Resources


def measure(sweep: dict, workdir: Path, worker_group: bool) -> dict:
    sweep = {**sweep, "resources": {**sweep.get("resources", {}), "worker_group": worker_group},
             "tracking_uri": f"sqlite:///{workdir}/mlflow.db", "storage": str(workdir / "ray")}
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    started = time.perf_counter()
    assert run_sweep(path) == 0, "the sweep failed"
    wall = time.perf_counter() - started
    client = MlflowClient(sweep["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(sweep["name"]).experiment_id], "tags.`isoflop.run_hash` != ''")
    training = sum(r.data.metrics["seconds"] for r in runs)
    resources = Resources(**sweep["resources"])
    concurrency = min(len(runs), trials_that_fit(resources, {"CPU": os.cpu_count() or 1}),
                      resources.max_concurrent_trials or len(runs))
    ideal = training / concurrency
    return {"trials": len(runs), "wall": wall, "training": training, "concurrency": concurrency,
            "overhead": 1 - ideal / wall, "per_trial": (wall - ideal) * concurrency / len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sweeps/demo.yaml")
    parser.add_argument("--only", choices=("default", "worker-group"), default=None)
    args = parser.parse_args()
    sweep = yaml.safe_load(Path(args.sweep).read_text())
    sweep["data"] = {**sweep["data"], "path": str(Path(sweep["data"]["path"]).resolve())} \
        if isinstance(sweep["data"], dict) else str(Path(sweep["data"]).resolve())
    modes = {"worker-group": True, "default": False}
    results = {}
    for name, worker_group in modes.items():
        if args.only and args.only != name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = results[name] = measure(sweep, Path(tmp), worker_group)
        print(f"{name:>12}: {r['trials']} trials, wall {r['wall']:,.0f}s, in-run training {r['training']:,.0f}s over "
              f"{r['concurrency']} slots -> overhead {r['overhead']:.1%} of wall time, fixed cost {r['per_trial']:.1f}s/trial",
              flush=True)
    if len(results) == 2:
        print(f"sweep_overhead: default {results['default']['overhead']:.1%} vs worker group "
              f"{results['worker-group']['overhead']:.1%}; wall-time ratio {results['default']['wall'] / results['worker-group']['wall']:.2f}")
    print("target: overhead <= 15% of wall time")


if __name__ == "__main__":
    main()
