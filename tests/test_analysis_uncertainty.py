"""Measurement errors in the runs table: standard errors checked, the best recipe variant per point, replicate
seeds averaged into points with a comparison error, weighted parabolas and the seed bootstrap."""
import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtri, stdtrit

from analysis.cli import main
from analysis.isoflop import _seed_means, bucket_budgets, fit_isoflop
from analysis.plots import render
from analysis.runs import (
    average_seeds,
    best_variants,
    clean,
    conform,
    from_mlflow,
    write_table,
)
from analysis.study import Settings, analyze
from analysis.synthetic import TRUTH, synthetic_runs
from pipeline.errors import RunsError
from pipeline.mlflow_keys import VARIANT_TAG

ARM = {"arm": TRUTH["arm"]}


def replicated(table: pd.DataFrame, offsets) -> pd.DataFrame:
    """Each run of `table` as len(offsets) seeds whose losses are the run's plus each offset."""
    return pd.concat([table.assign(seed=s, loss=table["loss"] + off) for s, off in enumerate(offsets)],
                     ignore_index=True)


# --- bad input ---

@pytest.mark.parametrize("column", ["val_stderr", "val_mc_stderr"])
def test_a_negative_standard_error_is_named(column):
    table = conform(synthetic_runs(ARM, budgets=(1e19,), sizes=4).assign(**{column: 0.01}, run_id=list("abcd")))
    table.loc[2, column] = -0.01
    with pytest.raises(RunsError) as err:
        clean(table)
    assert str(err.value) == f"{column}: run c has -0.01; standard errors cannot be negative"
    table.loc[2, column] = np.inf
    with pytest.raises(RunsError, match=f"{column}: run c has inf; standard errors must be finite"):
        clean(table)


def test_a_standard_error_missing_in_some_rows_of_a_file_is_an_error():
    table = conform(synthetic_runs(ARM, budgets=(1e19,), sizes=4).assign(val_mc_stderr=[0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(RunsError, match=r"val_mc_stderr: row 1 has none while 3 other run\(s\) have one"):
        clean(table)
    _, notes = clean(table.assign(val_mc_stderr=np.nan, val_stderr=np.nan))  # absent throughout: unknown
    assert notes == []


def test_rows_dropped_for_other_reasons_are_not_checked():
    table = conform(synthetic_runs(ARM, budgets=(1e19,), sizes=4).assign(val_stderr=[0.01, np.nan, 0.01, 0.01],
                                                                           status=["FINISHED", "FAILED"] * 2))
    kept, notes = clean(table)
    assert len(kept) == 2 and "status is not FINISHED" in notes[0]


def test_cli_exits_2_with_one_line_on_a_bad_standard_error(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    write_table(synthetic_runs(ARM, budgets=(1e19,), sizes=4).assign(val_stderr=[0.01, 0.01, -0.5, 0.01]), path)
    assert main(["--runs", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "val_stderr: row 2 has -0.5; standard errors cannot be negative" in err and len(err.splitlines()) == 1


def test_mlflow_runs_older_than_val_mc_stderr_make_it_unknown_for_their_family(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    rows = synthetic_runs(budgets=(1e19,), sizes=3).to_dict("records")  # 3 arm runs, then 3 mdm runs
    for i, row in enumerate(rows):
        tags = {"isoflop.run_hash": f"h{i}", **({VARIANT_TAG: "lr=0.002"} if i % 2 else {})}
        run = client.create_run(exp, tags=tags).info.run_id
        for key in ("family", "budget", "params", "tokens"):
            client.log_param(run, key, row[key])
        client.log_metric(run, "val_loss", row["loss"])
        client.log_metric(run, "val_stderr", 0.01)
        if i != 3:  # the first mdm run predates val_mc_stderr
            client.log_metric(run, "val_mc_stderr", 0.0 if row["family"] == "arm" else 0.002)
        client.set_terminated(run, "FINISHED")
    raw = conform(from_mlflow("sweep", uri))
    table, notes = clean(raw, mlflow=True)
    arm, mdm = (table[table["family"] == f] for f in ("arm", "mdm"))
    assert (arm["val_mc_stderr"] == 0).all() and mdm["val_mc_stderr"].isna().all()
    assert (table["val_stderr"] == 0.01).all()
    assert sorted(table["variant"]) == ["", "", "", "lr=0.002", "lr=0.002", "lr=0.002"]
    assert notes == [("mdm: 1 of 3 runs lack val_mc_stderr (logged before it existed): treated as unknown for every "
                      "mdm run, so its single-seed points are fitted unweighted")]
    with pytest.raises(RunsError, match="val_mc_stderr: run .* has none while 5 other run"):
        clean(raw)  # the same table from a file is an error


# --- best variant per point ---

def test_the_variant_with_the_lowest_mean_loss_wins_at_each_point():
    base = synthetic_runs(budgets=(1e19, 3e19), sizes=4, noise=0.0)
    rng = np.random.default_rng(1)
    best = rng.integers(0, 3, size=len(base))  # the known winner of each point
    variants = []
    for v in range(3):
        gap = np.where(best == v, 0.0, 0.02 * (v + 1))
        spread = np.where(best == v, 0.001, 0.025)  # some losers' lowest seed beats the winner's: the mean decides
        for s, sign in enumerate((-1, 1)):
            variants.append(base.assign(variant=f"lr={0.001 * 2 ** v:g}", seed=s,
                                        loss=base["loss"] + gap + sign * spread))
    table = pd.concat(variants, ignore_index=True).sample(frac=1.0, random_state=0)  # order must not matter
    kept, note = best_variants(table)
    assert len(kept) == 2 * len(base)
    winner = {(r.family, r.budget, r.params): r.variant for r in kept.itertuples()}
    expected = {(r.family, r.budget, r.params): f"lr={0.001 * 2 ** b:g}" for r, b in zip(base.itertuples(), best)}
    assert winner == expected
    assert note.startswith(f"best variant per point (lowest mean loss over seeds) at {len(base)} point(s) with several")
    assert "(of 3)" in note and note.endswith(f", and {len(base) - 6} more")

    study = analyze(table, Settings(bootstrap=0), log=lambda _: None)
    for family, fam in study.families.items():
        assert len(fam.runs) == 2 * (base["family"] == family).sum()
        assert {(r.family, r.budget, r.params): r.variant for r in fam.runs.itertuples()}.items() <= expected.items()
        assert any(n.startswith(f"{family}: best variant per point") for n in study.notes)
        # the winners' means sit on the noiseless law, so the parabolas find its optima
        for bucket in fam.isoflop.buckets:
            assert bucket.n_runs == 8 and bucket.l_opt == pytest.approx(TRUTH[family].loss(bucket.n_opt, bucket.d_opt),
                                                                           abs=2e-3)


def test_one_variant_per_point_passes_through_without_a_note():
    table = conform(synthetic_runs(ARM, budgets=(1e19,), sizes=3).assign(variant="lr=0.002"))
    kept, note = best_variants(table)
    assert note is None and kept is table


# --- replicate seeds ---

def test_seeds_are_averaged_with_their_standard_error():
    table = pd.DataFrame({
        "family": ["mdm"] * 6 + ["arm"] * 2,
        "budget": [1e19] * 8,
        "params": [1e8, 1e8, 1e8, 2e8, 4e8, 4e8, 1e8, 2e8],
        "loss": [3.0, 3.2, 3.1, 2.9, 2.95, 2.97, 2.8, 2.7],
        "seed": [0, 1, 2, 0, 0, np.nan, 0, 0],
        "val_mc_stderr": [0.004, 0.004, 0.004, 0.003, 0.002, 0.002, 0.0, 0.0],
    })
    points, seed_losses = average_seeds(table)
    assert points["params"].tolist() == [1e8, 2e8, 4e8, 4e8, 1e8, 2e8]  # no seed: a point of its own
    np.testing.assert_allclose(points["loss"], [3.1, 2.9, 2.95, 2.97, 2.8, 2.7])
    np.testing.assert_allclose(points["loss_se"], [0.1 / np.sqrt(3), 0.003, 0.002, 0.002, 0.0, 0.0])
    np.testing.assert_allclose(seed_losses[0], [3.0, 3.2, 3.1])
    assert np.isnan(seed_losses[1:, 1:]).all() and "seed" not in points.columns
    no_mc, _ = average_seeds(table.drop(columns="val_mc_stderr"))
    assert no_mc["loss_se"].iloc[0] == pytest.approx(0.1 / np.sqrt(3)) and no_mc["loss_se"].iloc[1:].isna().all()


def test_a_table_without_replicates_gives_its_runs_back():
    table = synthetic_runs(sizes=4)
    points, seed_losses = average_seeds(table.assign(seed=0))
    pd.testing.assert_frame_equal(points.drop(columns="loss_se"), table)
    assert seed_losses.shape == (len(table), 1) and points["loss_se"].isna().all()


# --- weighted parabolas ---

def curve(noisy_se: float, others_se: float = 0.001):
    """One IsoFLOP curve on a known parabola (N* = 3e8) whose largest size reads 0.1 too high."""
    n = np.geomspace(1e8, 1e9, 7)
    loss = 2.0 + 0.1 * (np.log(n) - np.log(3e8)) ** 2
    loss[-1] += 0.1
    se = np.full(len(n), others_se)
    se[-1] = noisy_se
    return n, 1e19 / (6 * n), loss, se


def test_a_point_with_a_large_error_moves_the_optimum_less_when_weighted():
    n, d, loss, se = curve(noisy_se=0.1)
    labels = np.zeros(len(n), dtype=int)
    unweighted = fit_isoflop(n, d, loss, labels, np.array([1e19])).buckets[0].n_opt
    weighted_fit = fit_isoflop(n, d, loss, labels, np.array([1e19]), loss_se=se, family="mdm")
    weighted = weighted_fit.buckets[0].n_opt
    assert abs(np.log(unweighted / 3e8)) > 0.05  # the bad point drags the plain fit
    assert abs(np.log(weighted / 3e8)) < 0.1 * abs(np.log(unweighted / 3e8))
    assert weighted_fit.notes[0] == "mdm: 1 of 1 IsoFLOP parabolas weighted by 1/loss_se"


@pytest.mark.parametrize("others_se", [0.0, np.nan])
def test_a_curve_with_a_zero_or_unknown_error_is_fitted_unweighted(others_se):
    n, d, loss, se = curve(noisy_se=0.1, others_se=others_se)
    labels = np.zeros(len(n), dtype=int)
    plain = fit_isoflop(n, d, loss, labels, np.array([1e19]))
    fit = fit_isoflop(n, d, loss, labels, np.array([1e19]), loss_se=se, family="arm")
    assert fit.buckets[0] == plain.buckets[0]
    assert "arm: IsoFLOP parabolas fitted unweighted" in fit.notes[0]


# --- replicate seeds in the bootstrap ---

def seed_curves(spread: float, sizes: int = 5, shape_effect: float = 0.0, resamples: int = 300):
    """Three seeds per point at -spread, 0, +spread around the law, each size's mean moved by ±shape_effect in
    turn (what a shape does that the parabola does not)."""
    runs = synthetic_runs(ARM, sizes=sizes, noise=0.0)
    runs["loss"] += shape_effect * np.where(runs.groupby("budget").cumcount() % 2 == 0, 1.0, -1.0)
    points, seed_losses = average_seeds(replicated(runs, (-spread, 0.0, spread)))
    labels, budgets = bucket_budgets(points["budget"].to_numpy(), 0.1)
    n, d, loss, se = (points[c].to_numpy() for c in ("params", "tokens", "loss", "loss_se"))
    return fit_isoflop(n, d, loss, labels, budgets, resamples, np.random.default_rng(0), "arm", se, seed_losses)


def widths(fit) -> list[float]:
    return [np.log(b.n_opt_ci[1] / b.n_opt_ci[0]) for b in fit.buckets]


def test_replicated_curves_resample_residuals_that_see_a_shape_effect_their_seeds_miss():
    """Seeds that agree to 0.002 at sizes whose means zig-zag by 0.02 about the parabola: the band follows the
    zig-zag, as a one-seed curve's would, not the seeds."""
    smooth, zigzag = seed_curves(0.002), seed_curves(0.002, shape_effect=0.02)
    assert any("5 IsoFLOP parabolas with replicate seeds weighted by sqrt(seeds)" in n for n in zigzag.notes)
    assert all(b.usable for b in zigzag.buckets)
    assert min(widths(zigzag)) > 5 * max(widths(smooth))


def test_with_three_sizes_per_curve_the_seeds_give_the_band():
    """Three sizes leave a parabola no residuals; replicate seeds still measure the noise, and the band widens
    with their spread."""
    narrow, wide = seed_curves(0.002, sizes=3), seed_curves(0.02, sizes=3)
    for a, b in zip(narrow.buckets, wide.buckets):
        assert a.n_opt == pytest.approx(b.n_opt)  # same means, same weights: same fit
    assert 0 < min(widths(narrow)) and min(widths(wide)) > 5 * max(widths(narrow))
    assert not any("no intervals" in note for note in wide.notes)


def test_two_seeds_resample_point_means_with_the_seed_variance_not_half_of_it():
    """Two seeds per point at ±d: each point's unbiased seed variance is 2d², so its mean's is d². A case bootstrap
    of the pair gives d²/2; the pooled, rescaled draws give d² (times (t/z)² for the pool's dof)."""
    d, points = 0.05, 30
    seed_losses = 3.0 + np.array([[-d, d]] * points)
    means = _seed_means(seed_losses, 4000, np.random.default_rng(0))
    widening = float(stdtrit(points, 0.975) / ndtri(0.975))
    assert np.std(means, axis=0).mean() == pytest.approx(d * widening, rel=0.05)
    assert np.allclose(means.mean(axis=0), 3.0, atol=0.005)


def test_replicates_flow_through_the_study_and_the_figure(tmp_path):
    table = replicated(synthetic_runs(sizes=5, noise=0.0, budgets=(1e19, 3e19, 1e20)), (-0.01, 0.0, 0.01))
    study = analyze(table, Settings(bootstrap=20), log=lambda _: None)
    fam = study.families["mdm"]
    assert len(fam.runs) == len(table) // 2 and [b.n_runs for b in fam.isoflop.buckets] == [15, 15, 15]
    assert "mdm: 3 IsoFLOP parabolas with replicate seeds weighted by sqrt(seeds)" in study.notes
    assert [p.name for p in render("isoflop_curves", study, tmp_path)] == ["isoflop_curves.png", "isoflop_curves.pdf"]
