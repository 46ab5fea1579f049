"""The band-coverage benchmark's simulation (benchmarks/band_coverage.py) through the real analysis: its truth has
the gap it claims, a noiseless study recovers that truth, and noisy studies run end to end with bands."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "band_coverage.py"
_spec = importlib.util.spec_from_file_location("band_coverage", PATH)
bench = sys.modules["band_coverage"] = importlib.util.module_from_spec(_spec)  # its dataclasses look it up there
_spec.loader.exec_module(bench)


def test_the_truth_has_gap_k_at_every_loss_and_one_exponent():
    truth = bench.Truth(bench.ARM_LAW, 150.0)
    laws = truth.laws()
    ref, other = laws[bench.REFERENCE], laws[bench.OTHER]
    for loss in (3.0, 3.2, 3.4):  # C(L) on the frontier L*(C) = E + K C^-gamma
        c = {name: (law.frontier_k() / (loss - law.E)) ** (1 / law.gamma) for name, law in laws.items()}
        assert c[bench.OTHER] / c[bench.REFERENCE] == pytest.approx(150.0, rel=1e-9)
    assert ref.allocation()[1] == other.allocation()[1] == pytest.approx(2 / 3)
    # the demo's ARM: N* = 700 and L* = 3.19 at its smallest budget
    n = bench.true_n_opt(ref, 3e9)
    assert n == pytest.approx(700, rel=0.01) and ref.loss(n, 3e9 / (6 * n)) == pytest.approx(3.19, abs=0.01)


def test_a_noiseless_study_recovers_the_gap_and_exponents():
    truth = bench.Truth(bench.ARM_LAW, 150.0, noise={bench.REFERENCE: 0.0, bench.OTHER: 0.0})
    row = bench.run_study(truth, "centred", 0, bootstrap=50)
    assert row["gap_kind"] == "power_law" and not row["gap_extrapolated"]
    assert row["gap"] == pytest.approx(150.0, rel=0.01)  # the pure power law's misfit to E + K C^-gamma: 0.5%
    assert row["gap_lo"] <= row["gap"] <= row["gap_hi"] < 1.05 * row["gap_lo"]
    for family in (bench.REFERENCE, bench.OTHER):
        assert row[f"{family}_exp"] == pytest.approx(truth.exponent, abs=1e-3)
        assert row[f"{family}_located"] == 3 and row[f"{family}_failed"] == 0


def test_noisy_studies_run_end_to_end_with_bands():
    truth = bench.Truth(bench.ARM_LAW, 150.0)
    rows = [bench.run_study(truth, design, i, bootstrap=60) for design, i in (("centred", 0), ("offset", 1))]
    for row in rows:
        assert row["gap_lo"] < row["gap"] < row["gap_hi"]
        ref = bench.REFERENCE
        assert row[f"{ref}_exp_lo"] < row[f"{ref}_exp"] < row[f"{ref}_exp_hi"]
        assert row[f"{ref}_exp_clo"] <= row[f"{ref}_exp_lo"] and row[f"{ref}_exp_chi"] >= row[f"{ref}_exp_hi"]
    assert rows[0]["gap"] != rows[1]["gap"]  # the noise and the design reach the analysis


def test_counting_failures_widens_only_by_the_failed_share():
    draws = np.linspace(0.0, 1.0, 1001)
    lo, hi = bench.counting_failures(draws)
    assert (lo, hi) == pytest.approx((0.025, 0.975), abs=1e-3)
    some = np.where(np.arange(1001) % 100 == 0, np.nan, draws)  # 1% failed: both ends move out, stay finite
    lo_some, hi_some = bench.counting_failures(some)
    assert lo_some < lo and hi_some > hi and math.isfinite(lo_some) and math.isfinite(hi_some)
    many = np.where(np.arange(1001) % 20 == 0, np.nan, draws)  # 5%: more than a tail's share
    assert bench.counting_failures(many) == (-math.inf, math.inf)


def test_replicate_seeds_are_separate_noisy_runs_the_analysis_averages():
    truth = bench.Truth(bench.ARM_LAW, 150.0, seeds=2)
    table = bench.simulate_table(truth, np.random.default_rng(0))
    per_point = table.groupby(["family", "budget", "params"])
    assert (per_point.size() == 2).all() and (per_point["loss"].nunique() == 2).all()
    assert sorted(table["seed"].unique()) == [0, 1]
    row = bench.run_study(truth, "centred", 0, bootstrap=60)
    assert row["gap_lo"] < row["gap"] < row["gap_hi"]
