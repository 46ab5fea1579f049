"""A ladder sweep against the same grid trained point by point: FLOPs trained, wall time, and whether the two
give each grid point the same validation loss.

Writes two sweep files (OUT/points.yaml, OUT/ladder.yaml) of the demo's MDM recipe on the wsd schedule, warmup
fixed at 10 steps, sizes by the demo's rule, over the issue's five budgets (1e11 to 1e12); they differ only in
`ladder: true`, and each has its own store and storage. Runs each sweep (the point-by-point one first), timing it,
then prints the FLOPs each trained, the ratio of wall times, and the largest difference in val_loss between a
point's run and its ladder branch (the same run: 0 where both ran with the same thread count). Resumable: rerun to
continue; a finished sweep reruns in seconds, so time only fresh runs.

    .venv/bin/python benchmarks/ladder_study.py --out results/ladder     # the issue's range; not yet timed
    .venv/bin/python benchmarks/ladder_study.py --out /tmp/l --budgets 3e9 6e9 1.2e10   # 5.5 min on busy cores

Build DeepSpeed's CPU ops first (any run does it): a sweep whose first trials find them built by another
environment waits about a minute for a rebuild, which lands in its wall time (docs/LOG.md, 2026-12-07).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from pipeline.data.dataset import load_dataset
from pipeline.sweep.grid import expand_grid, load_sweep
from pipeline.sweep.ladder import plan_ladder

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [1e11, 1.8e11, 3.2e11, 5.6e11, 1e12]


def sweep_file(out: Path, budgets: list[float], ladder: bool) -> Path:
    """The demo's MDM recipe on wsd with a fixed warmup, sizes around the demo's tokens_per_param."""
    sweep = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    name = "ladder" if ladder else "points"
    sweep.update(name=name, families=["mdm"], budgets=budgets, ladder=ladder,
                 data={"path": str(out / "data"), "synthetic": {"tokens": 24_000_000, "seed": 0}},
                 sizes={"per_budget": 5, "span": 6, "tokens_per_param": 600},
                 tracking_uri=f"sqlite:///{out / name / 'mlflow.db'}", storage=str(out / name / "ray"))
    sweep.pop("models", None)
    sweep["train"] = {**sweep["train"], "schedule": "wsd", "warmup_fraction": 0.0, "warmup_min_steps": 10}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", str(path)], check=True)
    return time.perf_counter() - started


def losses(path: Path) -> dict[str, float]:
    sweep = load_sweep(path)
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`isoflop.run_hash` != ''", max_results=1000)
    return {r.data.tags["isoflop.run_hash"]: r.data.metrics.get("val_loss") for r in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    points, ladder = (sweep_file(args.out, args.budgets, flag) for flag in (False, True))
    seconds = {name: run(path) for name, path in (("points", points), ("ladder", ladder))}
    data = load_dataset(args.out / "data").info
    sweep = load_sweep(ladder)
    grid, _ = expand_grid(sweep, data.vocab_size, data.fingerprint, data.train_blocks(sweep.train.seq_len))
    plan = plan_ladder(grid)
    by_point = sum(p.plan.flops for p in grid)
    print(f"FLOPs: ladder {plan.flops:.3g} ({len(plan.stable)} stable runs, {len(plan.branches)} branches, "
          f"{len(plan.alone)} alone) against {by_point:.3g} point by point: {plan.flops / by_point:.2f}x")
    print(f"wall time: ladder {seconds['ladder']:.0f} s against {seconds['points']:.0f} s point by point: "
          f"{seconds['ladder'] / seconds['points']:.2f}x (fresh runs only)")
    mine, theirs = losses(ladder), losses(points)
    shared = [h for h in mine if h in theirs and mine[h] is not None and theirs[h] is not None]
    worst = max((abs(mine[h] - theirs[h]) for h in shared), default=float("nan"))
    print(f"val_loss: {len(shared)} points in both, largest difference {worst:.3g} nats/token")


if __name__ == "__main__":
    main()
