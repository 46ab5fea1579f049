"""`isoflop analyze` end to end on a small generated table, its error exits, and the notebook."""
import json
from pathlib import Path

import pytest

from analysis.cli import main
from analysis.plots import FIGURES
from analysis.runs import write_table
from analysis.synthetic import TRUTH, synthetic_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs_csv(tmp_path) -> Path:
    path = tmp_path / "runs.csv"
    write_table(synthetic_runs(budgets=(1e19, 3e19, 1e20), sizes=5, noise=0.005, seed=0), path)
    return path


def strict_json(path: Path) -> dict:
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def test_analyze_writes_fits_report_and_every_figure(runs_csv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--runs", str(runs_csv), "--out", str(out), "--bootstrap", "100", "--gap-at", "2.5,3.0",
               "--entropy-rate", "1.7", "--holdout-largest"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bootstrap" in printed and str(out) in printed

    fits = strict_json(out / "fits.json")
    for family in ("arm", "mdm"):
        fam = fits["families"][family]
        for bucket in fam["isoflop"]["budgets"]:
            assert {"budget", "n_opt", "d_opt", "l_opt", "edge"} <= set(bucket)
        for law in ("n_opt_law", "d_opt_law", "l_opt_law"):
            assert {"coef", "exponent", "ci"} <= set(fam["isoflop"][law])
            assert set(fam["isoflop"][law]["ci"]) == {"coef", "exponent"}
        para = fam["parametric"]
        assert {"E", "A", "B", "alpha", "beta", "ci"} <= set(para)
        assert para["E_minus_entropy_rate"]["value"] == pytest.approx(para["E"] - 1.7)
    gap = fits["compute_gap"]
    assert gap["reference"] == "arm" and gap["other"] == "mdm"
    assert all({"loss", "gap", "lo", "hi", "extrapolated"} <= set(p) for p in gap["curve"])
    assert [p["loss"] for p in gap["at"]] == [2.5, 3.0]
    assert len(fits["holdout"]) == 4  # two families x (power laws, parametric law)

    report = (out / "report.md").read_text()
    assert "entropy rate H = 1.7" in report and "Compute gap" in report
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 10_000 and (out / f"{name}.pdf").is_file()
        assert f"]({name}.png)" in report


def test_column_map_family_default_and_entropy_column(tmp_path):
    table = synthetic_runs({"arm": TRUTH["arm"]}, sizes=5)
    table = table.drop(columns=["family", "tokens"]).rename(columns={"loss": "val_loss"}).assign(entropy_rate_nats=1.6)
    path = tmp_path / "runs.parquet"
    write_table(table, path)
    assert main(["--runs", str(path), "--map", "loss=val_loss", "--out", str(tmp_path / "o"), "--bootstrap", "20"]) == 0
    fits = strict_json(tmp_path / "o" / "fits.json")
    assert list(fits["families"]) == ["all"] and fits["entropy_rate_nats"] == 1.6
    assert fits["compute_gap"] is None


@pytest.mark.parametrize("args, message", [
    (["--map", "loss=nope"], "unknown column 'nope'"),
    (["--map", "size=N"], "unknown column 'size'"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--gap-at", "two"], "--gap-at"),
])
def test_bad_input_exits_2_with_one_line(runs_csv, tmp_path, capsys, args, message):
    assert main(["--runs", str(runs_csv), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unusable_files_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("family,budget,params,loss\n")
    nan = tmp_path / "nan.csv"
    nan.write_text("family,budget,params,loss\narm,1e19,1e8,nan\narm,1e19,-2e8,3.0\n")
    for path, message in ((empty, "empty"), (nan, "no usable runs"), (tmp_path / "missing.csv", "not found")):
        assert main(["--runs", str(path), "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def test_notebook_regenerates_every_figure(tmp_path, runs_csv, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "notebooks" / "scaling_laws.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it without outputs"
    # the kernel inherits the environment: the parameter cell reads these
    monkeypatch.setenv("ISOFLOP_RUNS", str(runs_csv))
    monkeypatch.setenv("ISOFLOP_OUT", str(tmp_path / "figs"))
    monkeypatch.setenv("ISOFLOP_BOOTSTRAP", "50")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    for name in FIGURES:
        assert (tmp_path / "figs" / f"{name}.png").is_file() and (tmp_path / "figs" / f"{name}.pdf").is_file()
