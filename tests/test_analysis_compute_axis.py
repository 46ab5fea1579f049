"""`isoflop analyze --compute nominal|spent`: the same runs on the sweep's budgets or on the FLOPs they spent."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.runs import write_table
from analysis.synthetic import TRUTH, synthetic_runs

HEAD = {"arm": 1.0, "mdm": 0.5}  # how much more than 6N a small model spends per token: (1 + share·sqrt(3e8/N))


def spent_size(family, n):
    return n * (1 + HEAD[family] * np.sqrt(3e8 / n))


def six_nd_table():
    """A 6ND sweep: the law holds in N, and each run spent more than its budget, small models most."""
    table = synthetic_runs(budgets=(1e19, 3e19, 1e20), sizes=5, noise=0.005, seed=0)
    return table.assign(flops_convention="6ND",
                        flops_spent=[6 * d * spent_size(f, n) for f, n, d in table[["family", "params", "tokens"]]
                                     .itertuples(index=False)])


def spent_table():
    """A sweep budgeted in spent FLOPs: the law holds in the spent size M, C = 6·M·D on every curve."""
    rows, rng = [], np.random.default_rng(1)
    for family, law in TRUTH.items():
        log_m, a, _, _ = law.allocation()
        for c in (1e19, 3e19, 1e20):
            for m in np.exp(log_m) * c ** a * np.geomspace(1 / 4, 4, 5):
                n = float(m / (1 + HEAD[family] * np.sqrt(3e8 / m)))  # near enough: m is what the law sees
                d = c / (6 * m)
                rows.append({"family": family, "budget": c, "params": n, "tokens": d, "flops_spent": c,
                             "flops_convention": "spent",
                             "loss": float(law.loss(m, d) * np.exp(0.003 * rng.standard_normal()))})
    return pd.DataFrame(rows)


def analyze(tmp_path, capsys, table, *args):
    write_table(table, tmp_path / "runs.csv")
    code = main(["--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "out"), "--bootstrap", "50", *args])
    out, err = capsys.readouterr()
    fits = json.loads((tmp_path / "out" / "fits.json").read_text()) if code == 0 else None
    return code, out + err, fits


def test_the_spent_axis_needs_every_runs_flops_spent(tmp_path, capsys):
    code, printed, _ = analyze(tmp_path, capsys, six_nd_table().drop(columns="flops_spent"), "--compute", "spent")
    assert code == 2 and "--compute spent: 30 of 30 runs have no flops_spent" in printed


def test_a_sweep_budgeted_in_spent_flops_is_analyzed_on_them_and_finds_its_law(tmp_path, capsys):
    code, printed, fits = analyze(tmp_path, capsys, spent_table())
    assert code == 0, printed
    assert fits["settings"]["compute"] == "spent" and "Compute axis: spent" in printed
    arm = fits["families"]["arm"]["isoflop"]
    assert all(not b["edge"] for b in arm["budgets"])
    law = TRUTH["arm"]
    assert arm["n_opt_law"]["exponent"] == pytest.approx(law.beta / (law.alpha + law.beta), abs=0.03)
    assert fits["other_axis"] == []  # its budgets are spent FLOPs: there is no other axis
    code, _, nominal = analyze(tmp_path, capsys, spent_table(), "--compute", "nominal")
    assert code == 0 and nominal["families"]["arm"]["isoflop"]["n_opt_law"] == arm["n_opt_law"]


def test_a_6nd_sweep_on_spent_flops_rests_on_the_chinchilla_law_and_says_where_the_axes_disagree(tmp_path, capsys):
    code, printed, fits = analyze(tmp_path, capsys, six_nd_table())
    assert code == 0 and fits["settings"]["compute"] == "nominal"
    moved = [line for line in fits["other_axis"] if line.startswith("On spent FLOPs the mdm/arm gap")]
    assert moved and "outside this axis's 95% band" in moved[0] and moved[0] in printed
    code, printed, fits = analyze(tmp_path, capsys, six_nd_table(), "--compute", "spent")
    assert code == 0 and "not iso in spent compute (spent/C varies up to" in printed
    assert not fits["families"]["arm"]["isoflop"]["applicable"]
    assert [gap["frontier"] for gap in fits["compute_gaps"]] == ["saturating"]
    assert any(line.startswith("On nominal FLOPs the mdm/arm gap") for line in fits["other_axis"])
