"""A ladder sweep against the same grid trained point by point on the default cosine schedule: FLOPs trained, wall
time, each point's loss (ladder / cosine), and the IsoFLOP optima and compute gap each gives, with their bands.

Writes two sweep files (OUT/cosine.yaml, OUT/ladder.yaml) of the demo's recipe and shape ladder, warmup fixed at
10 steps, a fixed window of five sizes per budget (a ladder cannot follow the planner): the MDM over the issue's
five budgets (1e11 to 1e12), the ARM over three budgets where its losses reach the MDM's. They differ only in
`train.schedule` (cosine, or wsd with its cooldown) and `ladder: true`; each has its own store and storage. Runs
each sweep (cosine first), timing it, analyzes both, then prints the FLOPs each trained, the ratio of wall times,
the ratio of losses per point, and per budget the optimum N* and L* of each with the cosine grid's band.
Resumable: rerun to continue; a finished sweep reruns in seconds, so time only fresh runs.

    .venv/bin/python benchmarks/ladder_study.py --out results/ladder     # about 35 min on 2 quiet cores
    .venv/bin/python benchmarks/ladder_study.py --out /tmp/l --budgets 3e9 6e9 1.2e10 --arm-budgets 3e8 1e9 3e9

Build DeepSpeed's CPU ops first (any run does it): a sweep whose first trials find them built by another
environment waits about a minute for a rebuild, which lands in its wall time (docs/LOG.md, 2026-12-07).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from pipeline.mlflow_keys import HASH_TAG
from pipeline.sweep.grid import load_sweep
from pipeline.sweep.ladder import plan_ladder
from pipeline.sweep.plan import plan_sweep

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [1e11, 1.8e11, 3.2e11, 5.6e11, 1e12]
ARM_BUDGETS = [1e10, 3e10, 1e11]  # the demo's planner placed its ARM at 9.4e9-9.7e10 to reach the MDM's losses
# A fixed size rule centres its window on non-embedding N = sqrt(C / (6 tokens_per_param)); these put the demo's
# planned optima (spent N: MDM 1.3-1.6e4 at 1.5e11-8e11, ARM 3.7e3-1.2e4 at 9.4e9-5.8e10, about cpu16-4k and
# cpu16-0.3k to 2k) inside the windows (600 and 60, read as spent N, left most budgets at an edge: docs/LOG.md).
TOKENS_PER_PARAM = {"mdm": 2500, "arm": 4000}


def sweep_file(out: Path, budgets: dict[str, list[float]], ladder: bool) -> Path:
    sweep = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    name = "ladder" if ladder else "cosine"
    sweep.update(name=name, families=list(budgets), budgets=budgets, ladder=ladder,
                 data={"path": str(out / "data"), "synthetic": {"tokens": 32_000_000, "seed": 0}},
                 sizes={"per_budget": 5, "span": 6, "tokens_per_param": TOKENS_PER_PARAM, "ladder": "cpu16"},
                 tracking_uri=f"sqlite:///{out / name / 'mlflow.db'}", storage=str(out / name / "ray"))
    sweep["train"] = {**sweep["train"], "schedule": "wsd" if ladder else "cosine", "warmup_fraction": 0.0,
                      "warmup_min_steps": 10}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def isoflop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True)


def timed_sweep(path: Path) -> float:
    started = time.perf_counter()
    isoflop("sweep", str(path))
    return time.perf_counter() - started


def analyze(path: Path) -> dict:
    sweep = load_sweep(path)
    out = path.parent / sweep.name / "analysis"
    isoflop("analyze", "--experiment", sweep.name, "--tracking-uri", sweep.tracking_uri, "--out", str(out))
    fits = json.loads((out / "fits.json").read_text())
    fits["headline"] = (out / "report.md").read_text().splitlines()[2]
    return fits


def losses(path: Path) -> dict[tuple[str, float, str], float]:
    """(family, budget, model) -> val_loss of each finished point: a point's cosine and wsd runs differ in hash."""
    sweep = load_sweep(path)
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.name)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{HASH_TAG}` != '' and attributes.status = "
                              "'FINISHED'", max_results=1000)
    return {(r.data.params["family"], float(r.data.params["budget"]), r.data.params["model"]):
            r.data.metrics["val_loss"] for r in runs if "val_loss" in r.data.metrics}


def interval(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci and None not in ci else "[-]"


def compare_optima(cosine: dict, ladder: dict) -> None:
    for family in cosine["families"]:
        theirs = {b["budget"]: b for b in ladder["families"].get(family, {}).get("isoflop", {}).get("budgets", [])}
        for ours in cosine["families"][family]["isoflop"]["budgets"]:
            other = theirs.get(ours["budget"])
            if other is None:
                continue
            row = [f"{family} {ours['budget']:.3g}:"]
            for key, fmt in (("n_opt", ".3g"), ("l_opt", ".4f")):
                if ours["edge"] or other["edge"]:
                    row.append(f"{key} (edge: cosine {ours['edge']}, ladder {other['edge']})")
                    break
                lo, hi = ours["ci"][key] or (None, None)
                inside = lo is not None and lo <= other[key] <= hi
                row.append(f"{key} cosine {ours[key]:{fmt}} {interval(ours['ci'][key])}, ladder {other[key]:{fmt}}"
                           f" {'inside' if inside else 'OUTSIDE'}")
            print("  " + "; ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS, help="the MDM's")
    parser.add_argument("--arm-budgets", type=float, nargs="*", default=ARM_BUDGETS, help="none: the MDM alone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = {"mdm": args.budgets, **({"arm": args.arm_budgets} if args.arm_budgets else {})}
    cosine, ladder = (sweep_file(args.out, budgets, flag) for flag in (False, True))
    seconds = {name: timed_sweep(path) for name, path in (("cosine", cosine), ("ladder", ladder))}
    fits = {name: analyze(path) for name, path in (("cosine", cosine), ("ladder", ladder))}

    planned = plan_sweep(ladder, dry_run=True)
    grid, plan = planned.points, planned.ladder
    by_point = sum(p.plan.flops for p in grid)
    print(f"FLOPs: ladder {plan.flops:.3g} ({len(plan.stable)} stable runs, {len(plan.branches)} branches, "
          f"{len(plan.alone)} alone) against {by_point:.3g} point by point: {plan.flops / by_point:.2f}x")
    for family in budgets:  # a stable run serves one family: each family's ladder is its own
        points = [p for p in grid if p.spec.family == family]
        print(f"  {family}: {plan_ladder(points).flops / sum(p.plan.flops for p in points):.2f}x")
    print(f"wall time: ladder {seconds['ladder']:.0f} s against {seconds['cosine']:.0f} s point by point: "
          f"{seconds['ladder'] / seconds['cosine']:.2f}x (fresh runs only)")

    mine, theirs = losses(ladder), losses(cosine)
    for family in budgets:
        ratios = sorted(mine[k] / theirs[k] for k in mine if k in theirs and k[0] == family)
        if ratios:
            print(f"loss ladder / cosine, {family}: {len(ratios)} points, median {ratios[len(ratios) // 2]:.4f}, "
                  f"range {ratios[0]:.4f}-{ratios[-1]:.4f}")
    print("IsoFLOP optima per budget (the cosine grid's 95% band):")
    compare_optima(fits["cosine"], fits["ladder"])
    for name in ("cosine", "ladder"):
        print(f"{name}: {fits[name]['headline']}")


if __name__ == "__main__":
    main()
