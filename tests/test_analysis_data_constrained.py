"""The data-constrained law (Muennighoff et al. 2023): recovered from points drawn from its published fit, fitted end to
end by `isoflop analyze` on a table with unique data, and the runs table that feeds it."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.data_constrained import DataConstrainedLaw, fit_data_constrained, objective
from analysis.repetition import fresh_runs
from analysis.runs import average_seeds, conform, write_table
from analysis.synthetic import REPEATED_TRUTH, repeated_runs

# Muennighoff et al. (2023)'s fit to their C4 runs, as released with the paper (github.com/huggingface/datablations,
# README, "Parametric Fit"): a, b, e = ln A, ln B, ln E = 6.255414, 7.3049974, 0.6254804, alpha = beta = 0.3526596,
# R*_D = 15.387756, R*_N = 5.309743; that is E = 1.869, A = 520.8, B = 1487.7.
PUBLISHED = DataConstrainedLaw(E=np.exp(0.6254804), A=np.exp(6.255414), B=np.exp(7.3049974), alpha=0.3526596,
                               beta=0.3526596, rd_star=15.387756, rn_star=5.309743)


def published_grid(law: DataConstrainedLaw, noise: float = 0.0, seed: int = 0):
    """Sizes 1e7..1e10, unique data 1e8..1e10, 0.5 to 64 epochs: the paper's range, over- and under-parameterised."""
    n, epochs, unique = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 5), 2.0 ** np.arange(-1, 7),
                                                        [1e8, 1e9, 1e10], indexing="ij"))
    tokens = epochs * unique
    loss = law.loss(n, tokens, unique) * np.exp(noise * np.random.default_rng(seed).standard_normal(len(n)))
    return n, tokens, unique, loss


@pytest.mark.parametrize("noise, rd_tolerance, rn_tolerance, e_tolerance", [
    (0.0, 0.01, 0.01, 0.01),     # noise-free: every parameter to 1%
    (0.005, 0.20, 0.25, 0.03),   # 0.5% multiplicative noise on each loss: R*_D to 20% (seeds 0-5 land within 8%)
])
def test_published_coefficients_are_recovered(noise, rd_tolerance, rn_tolerance, e_tolerance):
    fit = fit_data_constrained(*published_grid(PUBLISHED, noise), fit_rn=True)
    law = fit.law
    assert law.rd_star == pytest.approx(PUBLISHED.rd_star, rel=rd_tolerance)
    assert law.rn_star == pytest.approx(PUBLISHED.rn_star, rel=rn_tolerance)
    assert law.E == pytest.approx(PUBLISHED.E, rel=e_tolerance)
    assert (law.alpha, law.beta) == pytest.approx((PUBLISHED.alpha, PUBLISHED.beta), rel=5 * e_tolerance)
    assert not fit.degenerate


def test_without_excess_parameters_r_star_d_alone_is_recovered():
    truth = DataConstrainedLaw(PUBLISHED.E, PUBLISHED.A, PUBLISHED.B, PUBLISHED.alpha, PUBLISHED.beta,
                               PUBLISHED.rd_star)
    fit = fit_data_constrained(*published_grid(truth))
    assert fit.law.rn_star is None and fit.law.rd_star == pytest.approx(truth.rd_star, rel=0.01)


@pytest.mark.parametrize("fit_rn", [False, True])
def test_the_objectives_gradient_matches_finite_differences(fit_rn):
    n, tokens, unique, loss = published_grid(PUBLISHED, noise=0.02)
    f = objective(np.log(n), np.log(tokens), np.minimum(np.log(unique), np.log(tokens)), np.log(loss), 1e-3, fit_rn)
    theta = np.array([[6.0, 7.5, 0.5, 0.3, 0.4, np.log(12.0), np.log(4.0)][:7 if fit_rn else 6]])
    _, grad = f(theta, np.arange(1))
    step = np.eye(theta.shape[1]) * 1e-6
    numeric = [(f(theta + h, np.arange(1))[0] - f(theta - h, np.arange(1))[0])[0] / 2e-6 for h in step]
    assert grad[0] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_analyze_fits_each_familys_half_life_end_to_end(tmp_path, capsys):
    runs = tmp_path / "runs.csv"
    write_table(repeated_runs(noise=0.003, seed=1), runs)
    out = tmp_path / "out"
    assert main(["--runs", str(runs), "--out", str(out), "--bootstrap", "40", "--floor", "1.8"]) == 0
    printed = capsys.readouterr().out
    assert "Repetition half-life R*_D" in printed

    constrained = json.loads((out / "fits.json").read_text())["data_constrained"]
    arm, mdm = constrained["families"]["arm"], constrained["families"]["mdm"]
    assert arm["rd_star"] == pytest.approx(REPEATED_TRUTH["arm"].rd_star, rel=0.3)
    assert arm["ci"]["rd_star"][0] <= arm["rd_star"] <= arm["ci"]["rd_star"][1]
    assert mdm["rd_star"] > 5 * arm["rd_star"]  # an MDM gains from repeats far longer (truth: 500 against 15)
    ratio = constrained["rd_star_ratio"][0]
    assert (ratio["other"], ratio["reference"]) == ("mdm", "arm") and ratio["value"] > 5
    assert {c["unique"] for c in constrained["crossover"]} == {1e9, 4e9}
    assert all(c["status"] in ("crosses", "below", "none") for c in constrained["crossover"])

    report = (out / "report.md").read_text()
    assert report.index("## Data-constrained scaling") < report.index("Input:")  # the report opens with it
    assert "](loss_against_epochs.png)" in report and (out / "loss_against_epochs.pdf").is_file()


def test_a_table_without_unique_data_has_no_data_constrained_entry(tmp_path):
    runs = tmp_path / "runs.csv"
    write_table(repeated_runs(epochs=(0.25, 0.5, 1)).drop(columns="unique_tokens"), runs)
    assert main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    fits = json.loads((tmp_path / "out" / "fits.json").read_text())
    assert fits["data_constrained"] is None and not (tmp_path / "out" / "loss_against_epochs.png").exists()


def test_the_runs_table_counts_epochs_against_unique_data_and_keeps_sizes_apart():
    table = conform(pd.DataFrame({
        "family": ["arm"] * 4, "budget": [6e9] * 4, "params": [1e3] * 4, "tokens": [1e6] * 4, "seed": [0, 1, 0, 0],
        "unique_tokens": [None, None, 2.5e5, 1e6], "epochs": [0.1, 0.1, None, None], "loss": [3.0, 3.2, 3.4, 3.1]}))
    assert table["unique_tokens"].isna().tolist() == [True, True, False, False]
    assert table["epochs"].tolist() == [0.1, 0.1, 4.0, 1.0]
    points, _ = average_seeds(table)  # two seeds of the whole corpus are one point; each subset is its own
    assert points["loss"].tolist() == pytest.approx([3.1, 3.4, 3.1])
    fresh, notes = fresh_runs(table)
    assert fresh["epochs"].tolist() == [0.1, 0.1, 1.0] and "1 of 4 runs repeated data" in notes[0]


def test_from_mlflow_reads_each_runs_unique_data(tmp_path):
    from mlflow.tracking import MlflowClient

    from analysis.runs import clean, from_mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    for i, unique in enumerate(["None", "250000"]):  # as the sweep logs train.unique_tokens: None on the whole corpus
        run = client.create_run(exp, tags={"isoflop.run_hash": f"h{i}"}).info.run_id
        for key, value in {"family": "arm", "budget": 6e9, "params": 1e3, "tokens": 1e6, "epochs": 0.1,
                           "train.unique_tokens": unique}.items():
            client.log_param(run, key, value)
        client.log_metric(run, "val_loss", 3.0)
        client.set_terminated(run, "FINISHED")
    table, _ = clean(conform(from_mlflow("sweep", uri)))
    table = table.sort_values("unique_tokens", na_position="first")
    assert np.isnan(table["unique_tokens"].iloc[0]) and table["unique_tokens"].iloc[1] == 250_000
    assert table["epochs"].tolist() == [0.1, 4.0]
