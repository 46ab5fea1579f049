"""The planner on a corpus nobody tuned for: does an adaptive sweep that starts from tokens_per_param = 20 for
both families end with interior optima everywhere and a measured gap, and what does it spend?

Writes a synthetic corpus of another language (its own seed and vocabulary) to OUT/data, runs the demo's
sweep (planner, matched ARM budgets, spent FLOPs) on it (OUT/study.yaml), analyzes it, and prints per budget
whether its optimum is interior, the headline gap with its band, and the FLOPs the planner spent against a
hand-centred grid of the same budgets (five sizes each). Resumable: rerun to continue an interrupted study.

    .venv/bin/python benchmarks/adaptive_study.py --out results/untuned      # about 20-40 min on 2 cores
    .venv/bin/python benchmarks/adaptive_study.py --out results/untuned2 --seeds 0 1   # about 50 min

Use a fresh --out for each set of seeds: runs of another seed set left in the store enter the analysis too.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from pipeline.data.synthetic import SyntheticSpec, synthetic
from pipeline.sweep.grid import load_sweep
from pipeline.sweep.plan import plan_sweep

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE = SyntheticSpec(content_tokens=700, topics=67, language_seed=7)  # vocab 768; the demo's is 512, seed 0


def study_file(out: Path, seeds: list[int]) -> Path:
    """The demo's sweep (budgets, planner, recipe) on this corpus, with no hand-set centring."""
    sweep = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    sweep["sizes"].pop("tokens_per_param", None)  # the planner's first guess: 20 for both families
    sweep["seeds"] = seeds
    sweep.update(name="untuned", data={"path": str(out / "data")},
                 tracking_uri=f"sqlite:///{out / 'mlflow.db'}", storage=str(out / "ray"))
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def isoflop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True)


def planned_budgets(path: Path) -> dict[str, set[float]]:
    """Each family's budgets the planner kept, re-derived from the finished runs: not a pilot it moved up."""
    curves = plan_sweep(path, dry_run=True).schedule.curves
    return {family: {c.budget for c in settled} for family, settled in curves.items()}


def summary(out: Path, path: Path) -> None:
    """Each budget's optimum, the report's headline, and the FLOPs spent against a hand-centred grid."""
    fits = json.loads((out / "analysis" / "fits.json").read_text())
    kept = planned_budgets(path)
    for family, result in fits["families"].items():
        for bucket in result["isoflop"]["budgets"]:
            state = "edge" if bucket["edge"] else f"interior, N* = {bucket['n_opt']:.3g}"
            if not any(abs(math.log(bucket["budget"] / b)) < math.log(1.1) for b in kept[family]):  # spent, not set
                state += " (a pilot the planner moved up: its optimum lies below the ladder)"
            print(f"{family} {bucket['budget']:.3g}: {state}")
    print((out / "analysis" / "report.md").read_text().splitlines()[2])
    runs = pd.read_csv(out / "analysis" / "runs.csv")
    spent = runs.groupby("family")["budget"].sum()
    seeds = runs["seed"].nunique()
    hand = runs.groupby("family")["budget"].apply(lambda b: 5 * seeds * b.unique().sum())
    for family in spent.index:
        print(f"{family}: {spent[family]:.3g} FLOPs over {runs[runs.family == family].budget.nunique()} budgets; "
              f"a 5-size grid of the same budgets and seeds: {hand[family]:.3g} ({spent[family] / hand[family]:.2f}x)")
    print(f"all: {spent.sum() / hand.sum():.2f}x the FLOPs of the hand-centred grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "untuned")
    parser.add_argument("--tokens", type=int, default=48_000_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds of every point; the planner centres on their mean loss")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "meta.json").exists():
        print(f"writing the corpus (vocab {LANGUAGE.content_tokens + LANGUAGE.topics + 1}) to {out / 'data'}", flush=True)
        synthetic(out / "data", tokens=args.tokens, seed=3, spec=LANGUAGE)
    path = study_file(out, args.seeds)
    load_sweep(path)  # a bad file fails here, before any compute
    isoflop("sweep", str(path))
    isoflop("analyze", "--experiment", "untuned", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
            "--out", str(out / "analysis"), "--floor", "entropy")
    summary(out, path)


if __name__ == "__main__":
    main()
