"""The adaptive planner (sizes.adapt): centring, edge extension, matched budgets, and decisions that depend on
the settled runs alone. The planner is a pure function, driven here by losses from known laws; one end-to-end
test kills an adaptive sweep and reruns it."""
import math
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers import TRAIN, assert_one_finished_run_per_point, child_runs, isoflop, start_sweep, write_sweep
from pipeline.data.dataset import load_dataset
from pipeline.errors import SweepError
from pipeline.sweep.adaptive import Curve, Planner, optimum, schedule
from pipeline.sweep.adaptive_search import DECISIONS_FILE
from pipeline.sweep.driver import run_sweep
from pipeline.sweep.grid import analysis_size, load_sweep
from pipeline.sweep.schema import SweepConfig

# N* = a C^b and L* = c C^d as the demo measured them (docs/LOG.md), and a parabola in ln N around N*
LAWS = {"mdm": (0.0158, 0.489, 11.39, -0.0465), "arm": (3.9e-4, 0.66, 6.186, -0.0303)}
CURVATURE = 0.08
MDM_BUDGETS = [1e11, 3e11, 1e12]
ROOT = Path(__file__).resolve().parents[1]


def spent_size(point) -> float:
    """N on the spent axis as the analysis reads it from a finished run (analysis/runs.py)."""
    return point.plan.flops_spent / (6 * point.plan.tokens)


def true_loss(point, noise: float = 0.0, rng=None, size=lambda p: p.spec.shape.non_embedding_params()) -> float:
    spec = point.spec
    a, b, c, d = LAWS[spec.family]
    n_opt = a * spec.budget ** b
    loss = c * spec.budget ** d + CURVATURE * math.log(size(point) / n_opt) ** 2
    return loss + (noise * rng.standard_normal() if noise else 0.0)


def sweep_config(budgets=None, families=("mdm", "arm"), convention="6ND", **sizes) -> SweepConfig:
    return SweepConfig(name="plan", data="unused", families=list(families), flops_convention=convention,
                       budgets=budgets or {"mdm": MDM_BUDGETS, "arm": {"match": "mdm", "count": 3}},
                       sizes={"per_budget": 5, "span": 6, "adapt": True, **sizes},
                       train={"seq_len": 128, "batch_size": 8, "min_steps": 40, "warmup_min_steps": 10})


def run_to_end(sweep: SweepConfig, one_at_a_time: bool = False, seed: int = 0, noise: float = 0.0, **truth):
    """Settle the planner's pending points (all at once, or one at a time in a random order) until it places no
    more; the final schedule and the results."""
    rng, results = np.random.default_rng(seed), {}
    for _ in range(500):
        planned = schedule(sweep, 512, results)
        pending = [p for p in planned.points if p.spec.run_hash not in results]
        if not pending:
            return planned, results
        for point in [pending[rng.integers(len(pending))]] if one_at_a_time else pending:
            results[point.spec.run_hash] = true_loss(point, noise, rng, **truth)
    raise AssertionError("the planner kept placing points")


def test_a_first_guess_30x_off_ends_with_interior_optima_near_the_truth():
    planned, _ = run_to_end(sweep_config())
    text = "\n".join(planned.decisions)
    assert "first guess tokens_per_param = 20" in text and "adding" in text  # the first window missed
    assert "mdm 3e+11: sizes centred on N = " in text and "scaled as C^0.5" in text
    assert re.search(r"mdm 1e\+12: sizes centred on .*N\*\(C\) = .* from 2 budgets", text)
    assert not planned.waiting
    for family, curves in planned.curves.items():
        a, b, _, _ = LAWS[family]
        assert curves and all(c.interior for c in curves), (family, curves)
        for curve in curves:  # the ladder is coarse, the truth a parabola: the vertex lands close
            assert abs(math.log(curve.n_opt / (a * curve.budget ** b))) < 0.15, (family, curve)
    # every MDM budget is a measured curve, at no more than 2x the FLOPs of a hand-centred 5-size grid
    mdm_flops = sum(p.plan.flops for p in planned.points if p.spec.family == "mdm")
    assert mdm_flops <= 2 * 5 * sum(MDM_BUDGETS)


def test_matched_budgets_reach_the_other_familys_losses():
    planned, _ = run_to_end(sweep_config())
    text = "\n".join(planned.decisions)
    assert "arm: pilot budget 6.2e+09 = mdm's smallest 1e+11 / prior_gap 16" in text
    arm, mdm = planned.curves["arm"], planned.curves["mdm"]
    assert len(arm) >= 3
    assert min(c.loss for c in arm) <= max(c.loss for c in mdm) and max(c.loss for c in arm) >= min(c.loss for c in mdm)
    assert re.search(r"arm: optimum losses .* overlap mdm's", text)
    # the ARM's budgets were placed from the measured gap, not listed: the truth's gap is about 200x
    gap = float(re.search(r"\), ([\d.e+]+)x arm's", text).group(1))
    assert 80 < gap < 600


def test_a_pilot_below_the_ladders_reach_moves_up_and_the_matched_budgets_end_interior(monkeypatch):
    """An ARM whose optimum at the pilot budget lies below the ladder's smallest shape (a large vocabulary's head
    makes every shape big on the spent axis): the pilot moves up until the ladder brackets its optimum."""
    monkeypatch.setitem(LAWS, "arm", (3.9e-5, 0.66, 6.186, -0.0303))  # N* = 110 at the first pilot's 6.2e9
    planned, _ = run_to_end(sweep_config())
    text = "\n".join(planned.decisions)
    assert "arm 6.2e+09: optimum left at the smaller edge" in text and "the ladder has no smaller shape" in text
    moved = re.findall(r"arm: pilot ([\d.e+]+) ends below the ladder's smallest shape; moved up [\d.]+x to ([\d.e+]+)", text)
    assert moved and moved[0][0] == "6.2e+09" and float(moved[-1][1]) > 6.2e9
    assert f"arm {moved[0][1]}: sizes centred on N = " in text and "(the ladder's smallest shape cpu-0.3k at the " \
                                                                   "window's lower end)" in text
    assert re.search(rf"arm: mdm reaches loss .*x arm.s {re.escape(moved[-1][1])}", text)  # placed from the moved pilot
    arm = planned.curves["arm"]  # the moved pilot and the matched budgets, not the edge pilots
    assert float(moved[-1][1]) in [c.budget for c in arm] and 6.2e9 not in [c.budget for c in arm]
    assert len(arm) >= 3 and all(c.interior for c in arm) and not planned.waiting, arm
    assert min(c.budget for c in arm) >= 1.5 * float(moved[-1][0])  # nothing placed where the ladder fell short


def test_an_overlap_the_ladder_cannot_reach_names_the_budget_that_would(monkeypatch):
    """The ARM's losses lie below the MDM's at every budget whose optimum the ladder holds: no ARM budget can meet
    the MDM's losses, and the planner says which MDM budget would."""
    monkeypatch.setitem(LAWS, "arm", (3.9e-5, 0.66, 6.186, -0.0303))  # N* below the ladder up to ~3e10
    monkeypatch.setitem(LAWS, "mdm", (0.0158, 0.489, 12.5, -0.0465))  # 10% above the demo's losses
    planned, _ = run_to_end(sweep_config())
    text = "\n".join(planned.decisions)
    assert "arm: no new budget" in text
    hint = re.search(r"arm: the overlap stays empty: mdm would reach arm's highest optimum loss ([\d.]+) near "
                     r"([\d.e+]+) FLOPs; another mdm budget above that", text)
    assert hint, text
    arm, mdm = planned.curves["arm"], planned.curves["mdm"]
    highest = max(c.loss for c in arm)
    assert highest == pytest.approx(float(hint.group(1)), abs=1e-4) and highest < min(c.loss for c in mdm)
    # the named budget lies beyond the MDM's largest, where its L*(C) reaches that loss
    _, _, c, d = LAWS["mdm"]
    reached = (float(hint.group(1)) / c) ** (1 / d)
    assert float(hint.group(2)) > max(MDM_BUDGETS) and abs(math.log(float(hint.group(2)) / reached)) < 0.5


def test_matched_budgets_stay_above_a_budget_whose_optimum_lay_below_the_ladder():
    """A pilot moved up past a budget where no shape was small enough: the matched budgets, placed from its
    curve with N* taken as C^0.5, would go back down there; they stop 1.5x above it."""
    planner = Planner(sweep_config(), 512, {}, "", None)
    rule = planner.sweep.budgets_for("arm")
    mdm = [Curve(1e11, 2e4, 3.50, True), Curve(3e11, 2.2e4, 3.45, True)]
    pilot = [Curve(5.6e10, 1.7e4, 3.17, True)]  # far below the MDM's losses: a large gap, small budgets
    assert min(planner.place("arm", rule, mdm, pilot)) < 1e9
    planner.below["arm"] = 9.4e9
    assert min(planner.place("arm", rule, mdm, pilot)) == 1.4e10
    assert "arm: budgets raised" in planner.out.decisions[-3] and \
        "below 1.41e+10 arm's optimum at 9.4e+09 lay below the ladder's smallest shape" in planner.out.decisions[-3]


@pytest.mark.parametrize("seed", [1, 2])
def test_decisions_depend_on_the_settled_runs_not_the_order_they_finish_in(seed):
    at_once, results = run_to_end(sweep_config(), noise=0.0)
    one_by_one, _ = run_to_end(sweep_config(), one_at_a_time=True, seed=seed, noise=0.0)
    assert one_by_one.decisions == at_once.decisions
    assert [p.spec.run_hash for p in one_by_one.points] == [p.spec.run_hash for p in at_once.points]
    # and again from the finished runs alone, as a rerun after a kill sees them
    assert schedule(sweep_config(), 512, results).decisions == at_once.decisions


def test_an_edge_at_the_end_of_the_ladder_says_so_and_inline_shapes_extend_it():
    tiny = {"mdm": [2e8]}
    planned, _ = run_to_end(sweep_config(tiny, ["mdm"], tokens_per_param=2000))  # N* at 2e8 is ~180, below cpu-0.3k
    assert any("optimum left at the smaller edge" in line and "add some under sizes.shapes" in line
               for line in planned.decisions)
    extended = sweep_config(tiny, ["mdm"], tokens_per_param=2000,
                            shapes=["{n_layer: 1, n_head: 1, d_model: 2, d_ff: 8, name: cpu-0.1k}",
                                    "{n_layer: 1, n_head: 1, d_model: 2, d_ff: 32, name: cpu-0.2k}"])
    planned, _ = run_to_end(extended)
    assert planned.curves["mdm"][0].interior
    assert any(p.spec.shape.label in ("cpu-0.1k", "cpu-0.2k") for p in planned.points)


def test_a_spent_sweep_is_planned_on_the_axis_the_analysis_fits():
    """Budgeted in spent FLOPs, the analysis sizes a run by its spent FLOPs per token / 6, which the LM head and
    attention inflate most at small N; the planner centres and judges edges on that same N."""
    sweep = sweep_config({"mdm": MDM_BUDGETS}, ["mdm"], convention="spent", ladder="cpu16")
    planned, _ = run_to_end(sweep, size=spent_size)
    assert planned.decisions[0].startswith("N below is spent N")
    a, b, _, _ = LAWS["mdm"]
    curves = planned.curves["mdm"]
    assert len(curves) == 3 and all(c.interior for c in curves), curves
    for curve in curves:
        assert abs(math.log(curve.n_opt / (a * curve.budget ** b))) < 0.15, curve
    assert all(p.spec.shape.label.startswith("cpu16-") for p in planned.points)
    for point in planned.points:
        assert analysis_size(sweep, "mdm", point.spec.shape, 512) == pytest.approx(spent_size(point), rel=1e-9)


def test_the_demo_is_planned_not_hand_centred():
    """The demo sweep places its own sizes and ARM budgets, on the compute its runs spend."""
    demo = load_sweep(ROOT / "sweeps" / "demo.yaml")
    assert demo.sizes.adapt and "tokens_per_param" not in demo.sizes.model_fields_set and demo.sizes.ladder == "cpu16"
    assert demo.flops_convention == "spent"
    assert demo.budgets["arm"].match == "mdm" and demo.budgets["arm"].count == 3


def test_optimum_classifies_edges_flat_curves_and_interior_vertices():
    ns = [1e3, 2e3, 4e3, 8e3, 16e3]
    bowl = {n: 3 + 0.1 * math.log(n / 4e3) ** 2 for n in ns}
    side, n_opt, _, _ = optimum(bowl)
    assert side is None and n_opt == pytest.approx(4e3, rel=1e-6)
    assert optimum({n: 3 - 0.01 * math.log(n) for n in ns})[0] == "larger"
    assert optimum({n: 3 + 0.01 * math.log(n) for n in ns})[0] == "smaller"
    # the vertex is inside, but the larger end rises less than the residual scatter
    noisy = {1e3: 3.30, 2e3: 3.10, 4e3: 3.02, 8e3: 3.00, 16e3: 3.06}
    assert optimum(noisy)[0] is None
    flat = {1e3: 3.30, 2e3: 3.02, 4e3: 3.07, 8e3: 3.00, 16e3: 3.03}
    assert optimum(flat)[0] == "larger" and "flat within its noise" in optimum(flat)[3]


def test_match_needs_adapt_another_family_and_no_searched_recipe(tmp_path):
    base = {"budgets": {"mdm": [1e11], "arm": {"match": "mdm", "count": 2}}, "models": None}
    cases = [({**base, "models": ["cpu-2k"]}, "budgets.arm: {match: mdm} places budgets from measured losses; it needs sizes: {adapt: true}"),
             ({**base, "budgets": {"mdm": [1e11], "arm": {"match": "arm"}}, "sizes": {"adapt": True}},
              "budgets.arm.match: 'arm' must be another family"),
             ({**base, "sizes": {"adapt": True}, "train": {**TRAIN, "lr": [1e-3, 2e-3]}}, "sizes.adapt: plans one IsoFLOP"),
             ({**base, "sizes": {"adapt": True}, "budgets": {"mdm": [1e11], "arm": {"match": "mdm", "count": 0}}},
              "count")]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(SweepError, match=re.escape(message)):
            load_sweep(write_sweep(tmp_path, name=f"bad{i}", **overrides))


def test_dry_run_shows_the_first_wave_and_what_later_budgets_wait_for(tmp_path, capsys):
    path = write_sweep(tmp_path, name="plan-dry", budgets={"mdm": [2e9, 6e9], "arm": {"match": "mdm"}}, models=None,
                       sizes={"per_budget": 3, "span": 4, "adapt": True})
    assert run_sweep(path, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "[planner] mdm 2e+09: sizes centred on N = 4.08e+03 (first guess tokens_per_param = 20)" in out
    assert "[planner] arm: pilot budget 1.2e+08" in out
    assert "6 runs" in out and "placed so far" in out
    assert "waiting: mdm 6e+09: waits for mdm 2e+09" in out
    assert "waiting: arm matched budgets: wait for its pilot 1.2e+08 and mdm's first 2 budget(s)" in out


@pytest.mark.slow
def test_sigkilled_adaptive_sweep_reruns_to_the_same_decisions(tmp_path):
    path = write_sweep(tmp_path, name="plan-kill", families=["mdm"], budgets=[2e9, 6e9], models=None,
                       sizes={"per_budget": 3, "span": 4, "adapt": True, "extend": 2})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = start_sweep(path)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(driver.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:  # kill once the second budget has been placed
        if any("mdm 6e+09: sizes centred" in line for line in output):
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep ended before it could be interrupted:\n" + "".join(output)[-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    reader.join(timeout=30)
    before = [line.rstrip("\n") for line in output if line.startswith("[planner]")]
    time.sleep(5)  # a trial past its last step may still record its finish as Ray winds down
    proc = isoflop("sweep", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:]
    after = [line for line in proc.stdout.splitlines() if line.startswith("[planner]")]
    assert before == after[:len(before)]  # the rerun re-derives every decision made before the kill, in order
    _, runs = child_runs(uri, "plan-kill")
    data = load_dataset(tmp_path / "data").info
    final = schedule(load_sweep(path), data.vocab_size,
                     {r.data.tags["isoflop.run_hash"]: r.data.metrics["val_loss"] for r in runs},
                     data.fingerprint, data.train_blocks(TRAIN["seq_len"]))
    assert {p.spec.run_hash for p in final.points} == {r.data.tags["isoflop.run_hash"] for r in runs}
    assert_one_finished_run_per_point(uri, "plan-kill", len(final.points))
    parent = MlflowClient(uri).get_run(runs[0].data.tags["mlflow.parentRunId"])
    stored = MlflowClient(uri).download_artifacts(parent.info.run_id, DECISIONS_FILE, str(tmp_path))
    assert [f"[planner] {line}" for line in open(stored).read().splitlines()] == after
