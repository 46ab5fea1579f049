"""The paper's sweep file, read as a user would run it: its grid must bracket the paper's optima."""
from pathlib import Path

import pandas as pd

from pipeline.sweep.grid import expand_grid, load_sweep

PAPER_SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "smdm_paper.yaml"


def test_every_budget_brackets_the_papers_optimum_with_two_sizes_each_side(reference_dir):
    """At each budget, for each family, at least two sizes below and two above the paper's N*(C) (digitised)."""
    optima = pd.read_csv(reference_dir / "smdm_optima_digitized.csv")
    sweep = load_sweep(PAPER_SWEEP)
    points, dropped = expand_grid(sweep, vocab_size=sweep.data.vocab_size)
    assert not dropped
    for row in optima.itertuples():
        family = row.model.lower()
        sizes = {p.spec.shape.non_embedding_params() for p in points
                 if p.spec.family == family and p.spec.budget == row.C_flops}
        below = sum(n < row.N_opt_nonembedding_params for n in sizes)
        above = sum(n > row.N_opt_nonembedding_params for n in sizes)
        assert below >= 2 and above >= 2, (family, row.C_flops, row.N_opt_nonembedding_params, sorted(sizes))
