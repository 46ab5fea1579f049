"""Wall time of a full `isoflop analyze` (fits, 1000 bootstrap resamples, plots, report) on a 100-run,
2-family table, in process. Target: <= 60 s on the 2-core machine.

Usage: python benchmarks/analysis_speed.py [--bootstrap 1000] [--sizes 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from analysis.cli import main as analyze  # noqa: E402
from analysis.runs import write_table  # noqa: E402
from analysis.synthetic import BUDGETS, synthetic_runs  # noqa: E402

TARGET_S = 60.0


def bench(bootstrap: int, sizes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        table = synthetic_runs(sizes=sizes, noise=0.005, seed=0)
        runs = Path(tmp) / "runs.csv"
        write_table(table, runs)
        start = time.perf_counter()
        rc = analyze(["--runs", str(runs), "--out", str(Path(tmp) / "out"), "--bootstrap", str(bootstrap)])
        elapsed = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(f"analyze failed with exit code {rc}")
    print(f"\n{len(table)} runs ({len(BUDGETS)} budgets x {sizes} sizes x 2 families), {bootstrap} resamples: "
          f"{elapsed:.1f} s wall; {elapsed / TARGET_S:.2f} of the {TARGET_S:.0f} s target")
    return elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--sizes", type=int, default=10, help="model sizes per budget and family")
    args = parser.parse_args()
    bench(args.bootstrap, args.sizes)
