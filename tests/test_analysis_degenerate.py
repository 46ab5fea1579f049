"""Fits that say when they fail: E bounded to [0, lowest loss], degenerate fits marked and kept out of the
compute gap, --floor fixing E, and the optional runs-table columns (docs/method.md §6)."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import resample_counts
from analysis.cli import main
from analysis.frontier import power_law_frontier, saturating_frontier
from analysis.isoflop import PowerLaw, bucket_budgets
from analysis.lbfgs import minimize_batched
from analysis.parametric import ChinchillaLaw, fit_parametric
from analysis.runs import clean, conform, from_mlflow, write_table
from analysis.study import FamilyResult, Settings, compare_families
from analysis.synthetic import TRUTH, synthetic_runs

# a loss with no floor: E = 0, so the fit runs E down to its lower bound
NO_FLOOR = ChinchillaLaw(E=0.0, A=600.0, B=4200.0, alpha=0.35, beta=0.37)
SMALL = {"budgets": (1e19, 3e19, 1e20), "sizes": 5, "noise": 0.005, "seed": 0}


def fits_of(out) -> dict:
    return json.loads((out / "fits.json").read_text())


def with_bootstrap(table: pd.DataFrame, resamples: int = 100):
    labels, _ = bucket_budgets(table["budget"].to_numpy(), 0.1)
    counts = resample_counts(labels, resamples, np.random.default_rng(0))
    return fit_parametric(*(table[c].to_numpy(float) for c in ("params", "tokens", "loss")), counts=counts)


def test_box_bounds_in_the_batched_lbfgs():
    centres = np.array([[1.0, -2.0], [3.0, 0.5]])

    def f(x, rows):
        d = x - centres[rows]
        return (d * d).sum(1), 2 * d

    # row 0: the optimum lies outside the box and ends on its edge; row 1: x1 is fixed (lower = upper)
    result = minimize_batched(f, np.zeros((2, 2)), lower=[[0.0, -1.0], [0.0, 0.25]], upper=[[2.0, 2.0], [5.0, 0.25]])
    assert result.converged.all()
    np.testing.assert_allclose(result.x, [[1.0, -1.0], [3.0, 0.25]], atol=1e-8)


def test_E_never_exceeds_the_lowest_loss():
    """An outlier below the true floor: unbounded, the Huber fit left E = 1.81 above it; now E stops at it."""
    table = synthetic_runs({"arm": TRUTH["arm"]}, noise=0.005)
    table.loc[table.index[-1], "loss"] = 1.5
    fit = fit_parametric(table["params"], table["tokens"], table["loss"])
    assert fit.law.E <= 1.5
    assert fit.degenerate == ["E at its upper bound, the lowest loss 1.5 (E = 1.5)"]


def test_clean_synthetic_fit_is_not_degenerate():
    fit = with_bootstrap(synthetic_runs({"mdm": TRUTH["mdm"]}))
    assert fit.degenerate == [] and fit.grid_edge == []
    assert fit.ci["E"][0] < TRUTH["mdm"].E < fit.ci["E"][1]


def test_a_loss_without_floor_is_marked_degenerate_everywhere(tmp_path):
    table = pd.concat([synthetic_runs({"arm": TRUTH["arm"]}, **SMALL), synthetic_runs({"mdm": NO_FLOOR}, **SMALL)])
    write_table(table, tmp_path / "runs.csv")
    out = tmp_path / "out"
    assert main(["--runs", str(tmp_path / "runs.csv"), "--out", str(out), "--bootstrap", "50"]) == 0
    fits = fits_of(out)
    mdm, arm = fits["families"]["mdm"], fits["families"]["arm"]
    assert mdm["parametric"]["degenerate"][0].startswith("E at its lower bound 0")
    assert mdm["frontiers"]["saturating"]["degenerate"] == mdm["parametric"]["degenerate"]
    assert arm["parametric"]["degenerate"] == [] and arm["parametric"]["E_fixed"] is None
    # the degenerate frontier is left out of the gap, with the reason; the power-law gap is still computed
    assert [g["frontier"] for g in fits["compute_gaps"]] == ["power_law"]
    [skipped] = fits["compute_gaps_skipped"]
    assert skipped["frontier"] == "saturating" and "E at its lower bound 0" in skipped["reason"]
    assert any("no saturating compute gap mdm/arm" in note for note in fits["notes"])
    report = (out / "report.md").read_text()
    assert "**Degenerate fit**: E at its lower bound 0" in report
    assert "mdm vs arm (saturating frontiers): not computed, degenerate Chinchilla fit" in report


def test_gap_computation_skips_a_degenerate_frontier():
    def family(name, degenerate):
        law = TRUTH[name]
        result = FamilyResult(name, pd.DataFrame(), np.array([1e19, 1e20]), None, None)
        result.frontiers["power_law"] = power_law_frontier(PowerLaw(45.0, -0.06), np.empty((0, 2)), (1e19, 1e20))
        result.frontiers["saturating"] = saturating_frontier(law, np.empty((0, 5)), (1e19, 1e20), degenerate)
        return result

    notes, skipped = [], []
    gaps = compare_families({"arm": family("arm", ()), "mdm": family("mdm", ("E at its lower bound 0",))},
                            Settings(), notes, skipped)
    assert [g.kind for g in gaps] == ["power_law"]
    assert [(k.other, k.kind) for k in skipped] == [("mdm", "saturating")]
    assert "mdm: E at its lower bound 0" in skipped[0].reason and "left out of the gap" in notes[0]
    assert [g.kind for g in compare_families({"arm": family("arm", ()), "mdm": family("mdm", ())},
                                             Settings(), [])] == ["power_law", "saturating"]


@pytest.fixture
def runs_csv(tmp_path):
    path = tmp_path / "runs.csv"
    write_table(synthetic_runs(**SMALL), path)
    return path


@pytest.mark.parametrize("flags, value, source", [
    (["--floor", "1.7"], 1.7, "--floor 1.7"),
    (["--floor", "entropy", "--entropy-rate", "1.75"], 1.75, "--floor entropy: the corpus entropy rate 1.75"),
    (["--floor", "0"], 0.0, "--floor 0"),
])
def test_floor_fixes_E_exactly(runs_csv, tmp_path, flags, value, source):
    out = tmp_path / "out"
    assert main(["--runs", str(runs_csv), "--out", str(out), "--bootstrap", "30", *flags]) == 0
    fits = fits_of(out)
    assert fits["settings"]["floor"] == {"value": value, "source": source}
    for fam in fits["families"].values():
        para = fam["parametric"]
        assert para["E"] == value and para["E_fixed"] == {"value": value, "source": source}
        assert para["ci"]["E"] is None and fam["frontiers"]["saturating"]["E"] == value
    report = (out / "report.md").read_text()
    assert f"E fixed to {value:.4g} nats/token ({source}), not fitted." in report


def test_floor_entropy_reads_the_tables_entropy_rate(tmp_path):
    path = tmp_path / "runs.csv"
    write_table(synthetic_runs(**SMALL).assign(entropy_rate_nats=1.72), path)
    assert main(["--runs", str(path), "--out", str(tmp_path / "o"), "--bootstrap", "0", "--floor", "entropy"]) == 0
    assert all(f["parametric"]["E"] == 1.72 for f in fits_of(tmp_path / "o")["families"].values())


@pytest.mark.parametrize("flags, message", [
    (["--floor", "abc"], "--floor expects a loss >= 0 in nats/token or 'entropy', got 'abc'"),
    (["--floor", "-0.5"], "--floor expects a loss >= 0 in nats/token or 'entropy', got '-0.5'"),
    (["--floor", "nan"], "got 'nan'"),
    (["--floor", "entropy"], "--floor entropy needs the corpus entropy rate"),
    (["--floor", "99"], "--floor 99 is above the lowest observed loss"),
    (["--floor", "entropy", "--entropy-rate", "50"], "--floor entropy (50 nats/token) is above the lowest observed loss"),
])
def test_bad_floor_exits_2_with_one_line(runs_csv, tmp_path, capsys, flags, message):
    assert main(["--runs", str(runs_csv), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_from_mlflow_carries_seed_and_epochs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    rows = synthetic_runs({"arm": TRUTH["arm"]}, budgets=(1e19,), sizes=3).to_dict("records")
    for i, row in enumerate(rows):
        run = client.create_run(exp, tags={"isoflop.run_hash": f"h{i}"}).info.run_id
        for key in ("family", "budget", "params", "tokens"):
            client.log_param(run, key, row[key])
        if i:  # run 0 predates the two params: NaN, and still usable
            client.log_param(run, "seed", i)
            client.log_param(run, "epochs", 0.5 * i)
        client.log_metric(run, "val_loss", row["loss"])
        client.set_terminated(run, "FINISHED")
    table, notes = clean(conform(from_mlflow("sweep", uri)))
    assert len(table) == 3 and notes == []
    table = table.sort_values("seed", na_position="first")
    assert np.isnan(table["seed"].iloc[0]) and table["seed"].iloc[1:].tolist() == [1.0, 2.0]
    assert np.isnan(table["epochs"].iloc[0]) and table["epochs"].iloc[1:].tolist() == [0.5, 1.0]
