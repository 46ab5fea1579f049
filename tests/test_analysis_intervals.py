"""IsoFLOP rows report an interval that holds their own estimate, and an optimum at or near the edge of the
sampled sizes is called an edge, with no numbers (analysis/isoflop.py); the residual bootstrap's t widening and
the gap's bias-corrected band (benchmarks/band_coverage.py measures their coverage)."""
import numpy as np
import pytest

from analysis.bootstrap import bias_corrected_interval, interval
from analysis.isoflop import _t_widening, fit_curve, fit_isoflop
from analysis.report import _bucket_cells


def one_curve(params, losses, budget, resamples=1000, seed=0):
    params, losses = np.array(params, dtype=float), np.array(losses, dtype=float)
    fit = fit_isoflop(params, budget / (6 * params), losses, np.zeros(len(params), dtype=int), np.array([budget]),
                      n_resamples=resamples, rng=np.random.default_rng(seed), family="f")
    return fit.buckets[0], fit.notes


def test_an_optimum_beside_the_smallest_size_of_a_curve_lowest_there_is_an_edge():
    """An ARM curve from real text: the parabola's vertex sits 2% inside the smallest size, whose loss is the lowest."""
    bucket, notes = one_curve([594, 1048, 1630, 2340, 4144], [5.7974, 5.8555, 5.8190, 5.8469, 5.9221], 1.1e9)
    assert bucket.edge and not bucket.usable and bucket.edge_side == "smaller"
    assert "half a grid step of the smallest sampled size" in bucket.note
    assert bucket.n_opt is bucket.d_opt is bucket.l_opt is bucket.tokens_per_param is None
    assert bucket.lowest == pytest.approx((594, 1.1e9 / (6 * 594), 5.7974))
    cells = _bucket_cells(bucket)
    assert cells.startswith("– | – | – | lowest measured: 5.797 | yes: N* = ")
    assert any("C=1.1e+09 optimum at the edge" in note for note in notes)


def test_an_edge_curve_prints_its_reason_and_no_numbers():
    """An MDM curve from real text, lowest at its smallest size; fitted unweighted, its vertex lies below it."""
    bucket, _ = one_curve([12628, 16480, 32928, 51400, 77080], [4.5378, 4.5522, 4.6756, 5.1345, 5.0517], 2e12)
    assert bucket.edge and bucket.edge_side == "smaller" and "below the smallest sampled size" in bucket.note
    assert bucket.n_opt is None and bucket.n_opt_ci is None and bucket.tokens_per_param is None
    assert _bucket_cells(bucket).startswith(f"– | – | – | lowest measured: 4.538 | yes: {bucket.note}")


def test_a_parabola_without_a_minimum_is_an_edge_on_the_side_of_its_lowest_loss():
    n = np.geomspace(1e6, 1e7, 5)
    bucket, _ = one_curve(n, 3.0 - 0.05 * np.log(n / 3e6) ** 2, 1e16, resamples=0)
    assert bucket.edge and "no minimum" in bucket.note and bucket.edge_side == "larger"


def test_an_interior_optimum_keeps_its_numbers_and_the_edge_rule_names_the_side():
    n = np.geomspace(1e6, 1e7, 5)
    middle, _ = one_curve(n, 3.0 + 0.05 * np.log(n / 3e6) ** 2, 1e16, resamples=0)
    assert not middle.edge and middle.n_opt == pytest.approx(3e6) and middle.edge_side is None
    near_top, _ = one_curve(n, 3.0 + 0.05 * np.log(n / 9e6) ** 2, 1e16, resamples=0)  # 0.05 steps from the end
    assert near_top.edge and near_top.edge_side == "larger" and "largest" in near_top.note


def test_no_reported_interval_leaves_out_its_estimate_across_simulated_curves():
    """Curves with their optimum anywhere from outside the grid to its centre, noisy, few or many sizes."""
    rng = np.random.default_rng(7)
    rows = located = edges = 0
    for trial in range(120):
        sizes = int(rng.integers(4, 8))
        n = np.geomspace(1e6, 1e6 * float(rng.uniform(4, 32)), sizes)
        x_star = np.log(n[0]) + rng.uniform(-0.3, 1.3) * np.log(n[-1] / n[0])
        truth = 3.0 + float(rng.uniform(0.02, 0.1)) * (np.log(n) - x_star) ** 2
        bucket, _ = one_curve(n, truth + rng.normal(0, float(rng.uniform(0.002, 0.03)), sizes), 1e16,
                              resamples=300, seed=trial)
        rows += 1
        if bucket.edge:
            edges += 1
            assert bucket.n_opt is None and bucket.l_opt is None
            continue
        located += 1
        for value, ci in ((bucket.n_opt, bucket.n_opt_ci), (bucket.d_opt, bucket.d_opt_ci),
                          (bucket.l_opt, bucket.l_opt_ci), (bucket.tokens_per_param, bucket.tokens_per_param_ci)):
            assert ci is not None and ci[0] <= value <= ci[1], (trial, bucket)
    assert rows == 120 and located >= 30 and edges >= 30  # both kinds of row were put to the test


def test_an_optimum_its_resamples_place_elsewhere_is_not_reported():
    """The guard behind every row: resamples that all put N* well away from the data's fit (as a biased
    bootstrap could) make the row unstable, an edge, rather than print an interval that leaves out its estimate."""
    n = np.geomspace(1e6, 1e7, 5)
    data = 3.0 + 0.05 * np.log(n / 3e6) ** 2
    elsewhere = [3.0 + 0.05 * np.log(n / centre) ** 2 for centre in np.geomspace(4.5e6, 5e6, 40)]
    curve = fit_curve(1e16, n, np.log(1e16 / (6 * n)), np.stack([data, *elsewhere]))
    assert curve.bucket.edge
    assert curve.bucket.note == "unstable: the fit's N*, D*, D*/N* lies outside its bootstrap interval"
    assert curve.bucket.n_opt is None and curve.bucket.edge_side is None


def test_residuals_are_widened_by_t_over_z_for_their_degrees_of_freedom():
    assert _t_widening(6) == pytest.approx(2.4469 / 1.95996, rel=1e-4)  # three 5-size curves
    assert _t_widening(20) == pytest.approx(2.0860 / 1.95996, rel=1e-4)
    assert 1 < _t_widening(10_000) < 1.001


def test_the_bias_corrected_band_moves_against_the_resamples_bias_and_holds_its_estimate():
    draws = np.random.default_rng(0).normal(0.0, 1.0, size=(4000, 1))
    centred = bias_corrected_interval(np.median(draws), draws)
    assert centred == pytest.approx(interval(draws), abs=1e-9)  # half below the estimate: the percentile band
    shifted = bias_corrected_interval(0.5, draws)  # resamples sit below the estimate: the band moves up past it
    assert shifted[0, 0] > interval(draws)[0, 0] + 0.5 and shifted[0, 0] < 0.5 < shifted[1, 0]
    with_failures = np.concatenate([draws, np.full((100, 1), np.nan)])
    assert bias_corrected_interval(0.5, with_failures) == pytest.approx(shifted)  # failed resamples left out
    assert np.isnan(bias_corrected_interval(np.nan, draws)).all()  # no estimate, no band
