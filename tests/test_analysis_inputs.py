"""Runs tables: reading, renaming, MLflow, and bad inputs that must give a clear message, never a crash."""
import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.runs import clean, conform, from_mlflow, load_runs, parse_map, write_table
from analysis.study import Settings, analyze
from analysis.synthetic import TRUTH, synthetic_runs
from pipeline.errors import RunsError

QUIET = Settings(bootstrap=50)
ARM = {"arm": TRUTH["arm"]}


def run_analysis(table: pd.DataFrame, settings: Settings = QUIET):
    messages = []
    study = analyze(table, settings, log=messages.append)
    return study, "\n".join(messages)


def test_file_roundtrip_with_renamed_columns_and_derived_tokens(tmp_path):
    raw = synthetic_runs(ARM, budgets=(1e19, 3e19), sizes=4)
    raw = raw.rename(columns={"params": "N", "loss": "val_loss", "budget": "C"}).drop(columns=["tokens", "family"])
    for suffix in ("csv", "parquet"):
        path = tmp_path / f"runs.{suffix}"
        write_table(raw, path)
        table, notes = load_runs(path, parse_map(["params=N", "loss=val_loss", "budget=C"]))
        assert notes == []
        assert set(table["family"]) == {"all"}  # no family column: one family
        np.testing.assert_allclose(table["tokens"], table["budget"] / (6 * table["params"]))


def test_unknown_or_missing_columns_are_named():
    raw = synthetic_runs(budgets=(1e19,), sizes=3)
    with pytest.raises(RunsError, match="unknown column 'nope'"):
        conform(raw, {"loss": "nope"})
    with pytest.raises(RunsError, match="unknown column 'size'"):
        parse_map(["size=N"])
    with pytest.raises(RunsError, match="lacks column"):
        conform(raw.drop(columns=["loss"]))
    with pytest.raises(RunsError, match="empty"):
        conform(raw.iloc[:0])


def test_nan_zero_and_negative_rows_are_dropped_by_name():
    table = conform(synthetic_runs(budgets=(1e19, 3e19), sizes=5))
    table.loc[1, "loss"] = np.nan
    table.loc[2, "params"] = -5.0
    table.loc[3, "budget"] = 0.0
    kept, notes = clean(table)
    assert len(kept) == len(table) - 3
    text = "\n".join(notes)
    assert "loss is missing or not a number: row 1" in text
    assert "zero or negative: row 2" in text and "row 3" in text


def test_nothing_usable_is_an_error():
    table = conform(synthetic_runs(budgets=(1e19,), sizes=3)).assign(loss=np.nan)
    with pytest.raises(RunsError, match="no usable runs left"):
        clean(table)


def test_unfinished_runs_are_left_out():
    table = conform(synthetic_runs(ARM, budgets=(1e19,), sizes=4).assign(status=["FINISHED", "FAILED", "FINISHED", None]))
    kept, notes = clean(table)
    assert len(kept) == 3 and "status is not FINISHED: row 1" in notes[0]


def test_edge_minimum_is_flagged_and_excluded():
    table = synthetic_runs(ARM, sizes=5, noise=0.0)
    top = table["budget"] == table["budget"].max()
    table.loc[top, "params"] /= 30  # every size at the top budget far below its optimum: loss still falling
    table.loc[top, "tokens"] = table.loc[top, "budget"] / (6 * table.loc[top, "params"])
    table.loc[top, "loss"] = TRUTH["arm"].loss(table.loc[top, "params"], table.loc[top, "tokens"])
    study, printed = run_analysis(table)
    iso = study.families["arm"].isoflop
    assert [b.edge for b in iso.buckets] == [False] * 4 + [True]
    assert "above the largest sampled size" in iso.buckets[-1].note
    assert "optimum at the edge" in printed and "excluded from the power-law fits" in printed
    assert iso.n_opt_law.n_points == 4


def test_single_budget_fits_what_it_can():
    study, printed = run_analysis(synthetic_runs(budgets=(1e19,), sizes=7))
    fam = study.families["arm"]
    assert fam.isoflop.buckets[0].usable and fam.isoflop.n_opt_law is None
    assert "need interior optima at >= 2 budgets" in printed
    assert "weakly determined" in printed
    assert "power_law" not in fam.frontiers
    # the gap falls back to the Chinchilla-law frontiers, but one budget leaves the mdm's law degenerate (B off the
    # start grid), so that gap is refused with the reason rather than computed (docs/method.md §6)
    assert not study.gaps and [k.kind for k in study.skipped_gaps] == ["saturating"]


def test_one_size_per_budget_makes_approach_2_not_applicable():
    study, printed = run_analysis(synthetic_runs(sizes=1, spread=1.0))  # one run per budget, at N*
    assert not study.families["arm"].isoflop.applicable
    assert "Approach 2 not applicable" in printed
    assert study.families["arm"].parametric is not None
    # 5 runs for 5 parameters: the Chinchilla fits are degenerate (E at 0), so the fallback gap is refused
    assert not study.gaps and [k.kind for k in study.skipped_gaps] == ["saturating"]


def test_too_few_runs_for_any_fit():
    study, printed = run_analysis(synthetic_runs(budgets=(1e19, 3e19), sizes=2))
    assert study.families["arm"].parametric is None and "needs >= 5 runs" in printed
    assert study.gaps == []


def test_from_mlflow_reads_child_runs(tmp_path):
    from helpers import log_study

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = synthetic_runs(ARM, budgets=(1e19,), sizes=3).to_dict("records")
    client, parent = log_study(uri, tmp_path, "sweep", rows, convention="6nd", failed=1)

    finished = from_mlflow("sweep", uri)
    assert len(finished) == 2 and set(finished["status"]) == {"FINISHED"}
    everything = from_mlflow("sweep", uri, finished_only=False)
    assert len(everything) == 3
    table, notes = clean(conform(everything))
    assert len(table) == 2 and "status is not FINISHED" in notes[0]
    row = table.sort_values("params").iloc[-1]
    expected = max(rows[1:], key=lambda r: r["params"])
    assert row["params"] == pytest.approx(expected["params"]) and row["loss"] == pytest.approx(expected["loss"])
    with pytest.raises(RunsError, match="not found"):
        from_mlflow("nope", uri)

    # the CLI path: two finished runs are too few for any fit, yet it reports and exits cleanly
    out = tmp_path / "out"
    assert main(["--experiment", "sweep", "--tracking-uri", uri, "--out", str(out), "--bootstrap", "10"]) == 0
    assert (out / "fits.json").is_file() and (out / "isoflop_curves.png").is_file()
    assert "status is not FINISHED" in (out / "report.md").read_text()
    attached = {a.path for a in client.list_artifacts(parent, "analysis")}  # the outputs join the sweep's run
    assert {"analysis/report.md", "analysis/fits.json", "analysis/runs.csv", "analysis/isoflop_curves.png"} <= attached


@pytest.mark.parametrize("flag", [True, False])
def test_a_relative_sqlite_uri_is_read_from_the_current_folder(tmp_path, monkeypatch, capsys, flag):
    """As `isoflop sweep` resolves it, so a later `analyze` from the same folder opens the same file."""
    import analysis.cli

    seen = []

    def fake_from_mlflow(experiment, uri, finished_only=True):
        seen.append(uri)
        raise RunsError("stop here")

    monkeypatch.setattr(analysis.cli, "from_mlflow", fake_from_mlflow)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from_env.db")
    args = ["--tracking-uri", "sqlite:///runs/mlflow.db"] if flag else []
    assert main(["--experiment", "sweep", "--out", str(tmp_path / "o"), *args]) == 2
    name = "runs/mlflow.db" if flag else "from_env.db"
    assert seen == ["sqlite:///" + str((tmp_path / name).resolve())]
    assert "stop here" in capsys.readouterr().err


def test_curves_of_exactly_three_runs_have_no_approach_2_intervals():
    table = pd.concat([synthetic_runs(ARM, sizes=3, noise=0.005),
                       synthetic_runs({"mdm": TRUTH["mdm"]}, sizes=5, noise=0.005)])
    study, printed = run_analysis(table)
    assert "no residuals" in printed
    assert study.families["arm"].isoflop.n_opt_law.exponent_ci is None
    gap = next(g for g in study.gaps if g.kind == "power_law")
    assert gap.at[0].gap is not None and gap.at[0].lo is None  # a value, but no band
