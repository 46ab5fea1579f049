"""The report's first lines: the compute gap at a loss both families measured, or a plain 'extrapolated'."""
import pandas as pd

from analysis.report import headline
from analysis.study import Settings, analyze
from analysis.synthetic import TRUTH, synthetic_runs


def two_families(arm_budgets, mdm_budgets) -> pd.DataFrame:
    return pd.concat([synthetic_runs({"arm": TRUTH["arm"]}, budgets=arm_budgets, seed=1),
                      synthetic_runs({"mdm": TRUTH["mdm"]}, budgets=mdm_budgets, seed=2)], ignore_index=True)


def test_headline_gives_a_measured_gap_with_its_band_when_the_losses_overlap():
    # the MDM needs about 16x the ARM's compute: budgets a decade higher put its losses on the ARM's
    study = analyze(two_families((1e18, 3e18, 1e19, 3e19), (1e19, 3e19, 1e20, 3e20)), Settings(bootstrap=200),
                    log=lambda _: None)
    first, *rest = headline(study)
    assert "a loss both families measured" in first and "extrapolated" not in first, first
    assert "95% band" in first and "overlap" in rest[-1]
    gap = study.gaps[0].at[0]
    assert not gap.extrapolated and gap.lo <= gap.gap <= gap.hi and 5 < gap.gap < 50


def test_headline_says_extrapolated_and_how_far_when_the_losses_do_not_meet():
    study = analyze(two_families((1e18, 3e18, 1e19), (1e18, 3e18, 1e19)), Settings(bootstrap=200), log=lambda _: None)
    first, *rest = headline(study)
    assert "**extrapolated**" in first, first
    assert "its measured budgets" in first  # by what factor a frontier is read beyond what was measured
    assert rest[-1].endswith("no overlap.")
    # and the gap figure's annotation says so too
    assert study.gaps[0].at[0].extrapolated
