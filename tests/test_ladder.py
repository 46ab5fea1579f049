"""Ladder sweeps (`ladder: true`): one stable run per size, a wsd cooldown branch per budget. The plan is a pure
function of the grid; a branch trains bit for bit what its point trained whole would; end-to-end sweeps (slow)
train every point once, survive SIGKILLs of stable runs and branches, and train fewer FLOPs than point by point."""
import re
import signal
import time

import pandas as pd
import pytest

from helpers import TRAIN, write_sweep
from pipeline.errors import SweepError
from pipeline.model.flops import budget_for_steps
from pipeline.model.shapes import resolve_shape
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.sweep.grid import expand_grid, load_sweep
from pipeline.sweep.ladder import (branch_step, finished_steps, ladder_work, plan_ladder, start_step, warmup_warnings)
from pipeline.sweep.progress import DONE, RUNNING, PointState
from pipeline.sweep.schema import SweepConfig
from pipeline.training import kept_checkpoints

MDM_BUDGETS = [1e11, 1.8e11, 3.2e11, 5.6e11, 1e12]
WSD = {"seq_len": 128, "batch_size": 8, "schedule": "wsd", "warmup_fraction": 0.0, "warmup_min_steps": 10,
       "min_steps": 40}


def sweep_config(train=None, **fields) -> SweepConfig:
    settings = {"name": "lad", "data": "unused", "families": ["mdm"], "budgets": MDM_BUDGETS, "ladder": True,
                "sizes": {"per_budget": 5, "span": 6, "tokens_per_param": 600}, "train": {**WSD, **(train or {})}}
    return SweepConfig(**{**settings, **fields})


def grid(sweep: SweepConfig):
    points, _ = expand_grid(sweep, 512)
    return points


def test_a_ladder_needs_wsd_once_for_every_run_and_a_fixed_grid(tmp_path):
    wsd = {**TRAIN, "schedule": "wsd"}
    cases = [({"train": TRAIN}, "ladder: true branches cooldowns off a run held at constant lr, which needs "
                                "train.schedule: wsd for every run (got cosine)"),
             ({"train": {**wsd, "schedule": ["cosine", "wsd"]}}, "train.schedule: wsd for every run (got ['cosine', "
                                                                  "'wsd'])"),
             ({"train": {**wsd, "decay_fraction": 1.0}},
              "ladder: true shares the steps before each decay: train.decay_fraction=1 has none"),
             ({"train": wsd, "models": None, "sizes": {"adapt": True}},
              "but sizes.adapt places points as runs finish: the two do not combine yet")]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(SweepError, match=re.escape(message)):
            load_sweep(write_sweep(tmp_path, name=f"bad{i}", ladder=True, **overrides))
    assert load_sweep(write_sweep(tmp_path, name="good", ladder=True, train=wsd)).ladder


def test_one_stable_run_per_size_branching_where_each_budgets_decay_starts():
    points = grid(sweep_config())
    ladder = plan_ladder(points)
    assert not ladder.alone and len(ladder.branches) == len(points) == 25
    shapes = [run.spec.shape.label for run in ladder.stable]
    assert len(shapes) == len(set(shapes)) == 7  # the five budgets' windows overlap: 7 sizes in all
    for run in ladder.stable:
        assert [b.step for b in run.branches] == sorted(b.step for b in run.branches)
        for b in run.branches:  # the branch is the point's own run, branching where its wsd decay starts
            recipe, steps = b.point.spec.train, b.point.plan.steps
            assert b.step == branch_step(b.point) == steps - recipe.decay_steps(steps)
            assert b.point.spec.shape == run.spec.shape
        assert run.spec == run.branches[-1].point.spec and run.end == run.branches[-1].step
        assert run.warmup == 10
    # the acceptance's five-budget MDM range: at most 0.7x the FLOPs of the same grid point by point
    by_point = sum(p.plan.flops for p in points)
    assert ladder.flops <= 0.7 * by_point
    # what is trained: each stable run to its last branch step, each branch from its step to the point's end
    steps = sum(run.end for run in ladder.stable) + sum(b.steps for b in ladder.branches)
    assert steps < sum(p.plan.steps for p in points)


def test_a_stable_run_is_named_by_what_its_shared_steps_depend_on():
    base = plan_ladder(grid(sweep_config()))
    fewer = plan_ladder(grid(sweep_config(budgets=MDM_BUDGETS[:3])))
    by_shape = {run.spec.shape.label: run.run_hash for run in base.stable}
    for run in fewer.stable:  # a budget more or less: the same stable run, trained further or not
        assert by_shape[run.spec.shape.label] == run.run_hash
    # the decay's settings do not touch the shared steps; the peak lr and the seed do
    assert {r.run_hash for r in plan_ladder(grid(sweep_config({"decay_shape": "1-sqrt", "min_lr_ratio": 0.05}))).stable} \
        == set(by_shape.values())
    assert not {r.run_hash for r in plan_ladder(grid(sweep_config({"lr": 1e-3}))).stable} & set(by_shape.values())
    seeds = plan_ladder(grid(sweep_config(seeds=[0, 1])))
    assert len(seeds.stable) == 2 * len(base.stable)


def test_searched_variants_each_get_their_stable_runs_and_a_size_at_one_budget_trains_alone():
    sweep = sweep_config({"lr": [1e-3, 2e-3]}, budgets=[1e11, 1e12], models=["cpu-9k", "cpu-33k"], sizes=None)
    ladder = plan_ladder(grid(sweep))
    assert len(ladder.stable) == 4 and not ladder.alone  # 2 sizes x 2 lr, each at both budgets
    one = plan_ladder(grid(sweep_config(budgets=[1e11])))
    assert not one.stable and len(one.alone) == 5 and one.flops == sum(p.plan.flops for p in one.alone)


def test_warmups_scaled_with_the_steps_split_the_stable_runs_and_say_so():
    points = grid(sweep_config({"warmup_fraction": 0.01}))
    ladder = plan_ladder(points)
    assert ladder.flops == pytest.approx(sum(p.plan.flops for p in points))  # every warmup differs: nothing shared
    lines = warmup_warnings(points)
    assert any("mdm cpu-9k (seed 0) warms up over 18, 32, 57, 99, 176 steps at its 5 budgets" in line
               and "train.warmup_fraction: 0" in line for line in lines)
    assert not warmup_warnings(grid(sweep_config()))


def test_the_work_left_after_a_kill():
    ladder = plan_ladder(grid(sweep_config()))
    run = next(r for r in ladder.stable if len(r.branches) == 5)
    steps = [b.step for b in run.branches]
    hashes = [b.point.spec.run_hash for b in run.branches]
    everything = {b.point.spec.run_hash for b in ladder.branches}
    # nothing done: every stable run trains every step
    fresh = ladder_work(ladder, everything, kept=lambda r: set(), resumable=lambda p: False)
    assert len(fresh.stable) == len(ladder.stable) and len(fresh.branches) == 25
    # killed midway: two branches finished, one kept checkpoint still serves, one branch has its own checkpoint
    todo = everything - set(hashes[:2])
    work = ladder_work(ladder, todo, kept=lambda r: {steps[2]} if r is run else set(),
                       resumable=lambda p: p.spec.run_hash == hashes[3])
    assert dict((r.run_hash, needed) for r, needed in work.stable)[run.run_hash] == (steps[4],)
    assert [b.step for r, b in work.branches if r is run] == steps[2:]
    # all branches finished: the stable run is not trained again
    done = ladder_work(ladder, everything - set(hashes), kept=lambda r: set(), resumable=lambda p: False)
    assert run.run_hash not in {r.run_hash for r, _ in done.stable}
    assert finished_steps(run, set(hashes[:2])) == steps[:2]


def test_a_stable_run_resumes_from_its_newest_checkpoint_before_the_first_step_it_lacks():
    assert start_step((300, 500), kept={100}, latest=250) == 250  # killed after a periodic checkpoint
    assert start_step((300, 500), kept={100, 300}, latest=None) == 300  # ... after a kept one
    assert start_step((300,), kept={400}, latest=450) is None  # only later ones: from the start
    assert start_step((300,), kept=set(), latest=None) is None


def test_the_board_weighs_a_stable_run_and_a_branch_by_the_steps_they_train():
    branch = PointState("b", "mdm", "cpu-9k", 1e12, RUNNING, step=75, steps=100, role="branch from 50", first=50,
                        work=5e11)
    assert branch.flops_done == pytest.approx(2.5e11) and branch.flops_left == pytest.approx(2.5e11)
    stable = PointState("s", "mdm", "cpu-9k", 1e12, DONE, role="stable", work=8e11)
    assert stable.flops_done == 8e11 and stable.flops_left == 0


def test_kept_checkpoints_are_complete_tag_folders(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (10, 20):
        (folder / kept_checkpoints.tag(step)).mkdir(parents=True)
    kept_checkpoints.mark(folder, 20)
    (folder / kept_checkpoints.LATEST).write_text(kept_checkpoints.tag(10))
    assert kept_checkpoints.kept_steps(folder) == {20} and kept_checkpoints.latest_step(folder) == 10
    kept_checkpoints.drop(folder, 20)
    assert kept_checkpoints.kept_steps(folder) == set() and not (folder / kept_checkpoints.tag(20)).exists()


def test_dry_run_prints_the_ladder_against_the_grid_point_by_point(tmp_path, capsys):
    from pipeline.sweep.driver import run_sweep

    train = {**TRAIN, "schedule": "wsd", "warmup_fraction": 0.0}
    path = write_sweep(tmp_path, name="lad-dry", families=["mdm"], budgets=[4e9, 8e9, 1.6e10], ladder=True, train=train)
    assert run_sweep(path, dry_run=True) == 0
    out = capsys.readouterr().out
    assert re.search(r"stable-mdm-cpu-26k-\w{12}\s+2\s+\d+ \(4e\+09\), \d+ \(8e\+09\), \d+ \(1\.6e\+10\)", out)
    ratio = float(re.search(r"ladder: 2 stable runs, 6 branches and 0 points alone train .* FLOPs .*, ([\d.]+)x the",
                            out).group(1))
    assert 0.5 < ratio < 0.7


# --- training: a branch is its point's run ---

SHAPE = resolve_shape("{n_layer: 1, n_head: 2, d_model: 32}")
RECIPE = TrainConfig(**{**TRAIN, "schedule": "wsd", "warmup_fraction": 0.0, "warmup_min_steps": 4,
                        "checkpoint_every": 7, "log_every": 1, "zero_stage": 2})


class Rows:
    def __init__(self):
        self.rows = []

    def metrics(self, rows):
        self.rows += [dict(r) for r in rows]

    def progress(self, row, steps):
        pass

    def checkpoint(self, step, directory, metrics):
        pass


def point(steps: int) -> RunSpec:
    budget = budget_for_steps(SHAPE, steps, batch_size=RECIPE.batch_size, seq_len=RECIPE.seq_len)
    return RunSpec(family="mdm", shape=SHAPE, budget=budget, train=RECIPE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pipeline.data.synthetic import synthetic

    return synthetic(tmp_path_factory.mktemp("data") / "synthetic", tokens=100_000, seed=0).path


def test_a_branch_trains_bit_for_bit_what_its_point_trains_whole(corpus, tmp_path, one_torch_thread):
    """A stable run to the longer point's decay, keeping a checkpoint where the shorter's decay starts; each branch
    from there equals its point trained whole from step 0, loss by loss, and a fresh run that loads the
    checkpoint and decays (the branch's own folder holds no checkpoint) gives the same curve."""
    from pipeline.training.loop import train

    short, long = point(30), point(50)
    steps = {"short": short.plan(512).steps, "long": long.plan(512).steps}
    b_short, b_long = (spec.train.decay_start(steps[name]) for name, spec in (("short", short), ("long", long)))
    assert (b_short, b_long) == (24, 40)
    stable = tmp_path / "stable"
    rows = Rows()
    assert train(long, corpus, stable, reporter=rows, stop_at=b_long, keep_at=frozenset({b_short, b_long}),
                 verbose=False) is None
    kept = stable / "checkpoints"
    assert kept_checkpoints.kept_steps(kept) == {b_short, b_long}  # the periodic ones (7, 14, ...) are gone
    assert {p.name for p in kept.glob("step*")} == {kept_checkpoints.tag(b_short), kept_checkpoints.tag(b_long)}
    for name, spec, b in (("short", short, b_short), ("long", long, b_long)):
        whole, branch = Rows(), Rows()
        full = train(spec, corpus, tmp_path / f"whole-{b}", reporter=whole, verbose=False)
        result = train(spec, corpus, tmp_path / f"branch-{b}", reporter=branch, resume_from=kept / kept_checkpoints.tag(b),
                       verbose=False)
        assert result.resumed_from_step == b and [r["step"] for r in branch.rows] == list(range(b + 1, steps[name] + 1))
        assert [r["loss"] for r in branch.rows] == [r["loss"] for r in whole.rows[b:]]  # bit for bit
        assert [r["lr"] for r in branch.rows] == [r["lr"] for r in whole.rows[b:]]
        assert result.val_loss == full.val_loss
        # the stable run's steps before b are the point's own
        assert [r["loss"] for r in rows.rows[:b]] == [r["loss"] for r in whole.rows[:b]]
    assert kept_checkpoints.kept_steps(kept) == {b_short, b_long}  # a branch reads its checkpoint, never moves it


# --- end to end ---

LADDER_TRAIN = {**TRAIN, "schedule": "wsd", "warmup_fraction": 0.0}
# long enough for a kill to land mid-way in a stable run and in a branch on a 2-core machine
KILL_BUDGETS, KILL_EPOCHS = [1.5e10, 5e10, 1e11], 2


def stable_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`isoflop.ladder.stable` != ''", max_results=100)


def kept_anywhere(storage) -> list:
    return [p for p in storage.glob("ladder/*/checkpoints/step*") if kept_checkpoints.is_kept(p)]


@pytest.mark.slow
def test_ladder_sweep_trains_each_point_once_as_a_branch_of_its_stable_run(tmp_path):
    from helpers import assert_one_finished_run_per_point, isoflop

    path = write_sweep(tmp_path, name="lad", families=["mdm"], budgets=[4e9, 8e9, 1.6e10], ladder=True,
                       train=LADDER_TRAIN)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = isoflop("sweep", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ladder: 2 stable runs to train" in proc.stdout and "ladder: 2 stable runs trained, 0 failed" in proc.stdout
    client, runs = assert_one_finished_run_per_point(uri, "lad", 6)
    stable = {r.data.tags["isoflop.ladder.stable"]: r for r in stable_runs(uri, "lad")}
    assert len(stable) == 2 and {r.info.status for r in stable.values()} == {"FINISHED"}
    points = {b.point.spec.run_hash: b for b in plan_ladder_of(path).branches}
    trained = 0
    for run in runs:  # each point is a branch: its own run, linked to its stable run, started at its decay
        branch = points[run.data.tags["isoflop.run_hash"]]
        assert run.data.tags["isoflop.ladder.branch_step"] == str(branch.step)
        assert run.data.tags["isoflop.ladder.branch_of"] in stable
        assert run.data.tags["isoflop.resumed"] == f"resumed at step {branch.step}"
        assert min(m.step for m in client.get_metric_history(run.info.run_id, "loss")) > branch.step
        trained += branch.steps
    for run in stable.values():
        trained += max(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert trained < sum(p.point.plan.steps for p in points.values())
    assert not kept_anywhere(tmp_path / "ray")  # every branch finished: its checkpoint went
    table = isoflop("runs", "--experiment", "lad", "--tracking-uri", uri, "--out", str(tmp_path / "runs.csv"))
    assert table.returncode == 0, table.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 6  # the grid points, no stable run
    again = isoflop("sweep", str(path))
    assert again.returncode == 0 and "6 finished" in again.stdout and "0 to run" in again.stdout


def plan_ladder_of(path):
    from pipeline.data.dataset import load_dataset
    from pipeline.sweep.ladder import plan_ladder

    sweep, data = load_sweep(path), load_dataset(load_sweep(path).data.path).info
    points, _ = expand_grid(sweep, data.vocab_size, data.fingerprint, data.train_blocks(sweep.train.seq_len))
    return plan_ladder(points)


def kill_when(driver, ready, what: str, timeout: float = 600) -> None:
    """SIGKILL the sweep `driver` as soon as `ready()` holds; fail if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None and not ready():
        time.sleep(0.1)
    assert driver.poll() is None, f"the sweep ended before {what}:\n" + driver.communicate()[0][-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(5)  # a trial past its last step may still record its finish as Ray winds down


@pytest.mark.slow
def test_sigkilled_ladder_sweep_mid_stable_run_and_mid_branch_trains_nothing_twice(tmp_path):
    """Kill the sweep while its stable runs train, rerun it and kill it again while a branch trains (past its own
    first checkpoint), then rerun to the end: one finished run per point, every resume at a checkpoint."""
    from helpers import assert_one_finished_run_per_point, isoflop, larger_corpus, start_sweep

    train = {**LADDER_TRAIN, "checkpoint_every": 20, "max_epochs": KILL_EPOCHS}
    path = write_sweep(tmp_path, name="lad-kill", families=["mdm"], budgets=KILL_BUDGETS, ladder=True,
                       train=train, data=larger_corpus(tmp_path))
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "ray"
    from pipeline.sweep.driver import run_sweep

    assert run_sweep(path, dry_run=True) == 0  # writes the corpus, which the plan below needs
    ladder = plan_ladder_of(path)
    folders = {run.run_hash: storage / "ladder" / run.run_hash / "checkpoints" for run in ladder.stable}

    ends = {run.run_hash: run.end for run in ladder.stable}

    def stable_midway() -> dict:  # stable runs past a checkpoint, not yet at their last step
        steps = {h: kept_checkpoints.latest_step(f) for h, f in folders.items()}
        return {h: s for h, s in steps.items() if s and s < ends[h]}

    kill_when(start_sweep(path), lambda: bool(stable_midway()), "a stable run checkpointed")
    at_kill = stable_midway()  # after the kill has settled: these were interrupted
    assert at_kill, "every stable run ended before the kill took effect; make KILL_BUDGETS larger"

    branches = {b.point.spec.run_hash: b for b in ladder.branches}

    def branch_midway() -> dict:  # branches past their own checkpoint, not finished
        found = {}
        for run_hash, branch in branches.items():
            folder = storage / "runs" / run_hash
            step = kept_checkpoints.latest_step(folder / "checkpoints")
            if step and not (folder / "result.json").exists():
                found[run_hash] = step
        return found

    kill_when(start_sweep(path), lambda: bool(branch_midway()), "a branch checkpointed")
    killed_branches = branch_midway()
    assert killed_branches, "every branch ended before the kill took effect; make KILL_BUDGETS larger"
    proc = isoflop("sweep", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = assert_one_finished_run_per_point(uri, "lad-kill", len(branches))
    for run in runs:
        run_hash = run.data.tags["isoflop.run_hash"]
        if run_hash in killed_branches:  # resumed from its own checkpoint (at or after the one seen), not the stable's
            resumed = int(run.data.tags["isoflop.resumed"].removeprefix("resumed at step "))
            assert resumed >= killed_branches[run_hash] > branches[run_hash].step and resumed % 20 == 0
    # each stable run resumed from its checkpoint: the second session said so, at or after the step seen at the kill
    for run_hash, step in at_kill.items():
        run = next(r for r in ladder.stable if r.run_hash == run_hash)
        log = (storage / "logs" / f"{run.run_name}.log").read_text()
        starts = [int(s) for s in re.findall(rf"\[{run.run_name}\] stable run: .*; from step (\d+)", log)]
        assert starts[0] == 0 and len(starts) >= 2 and starts[1] >= step, starts
        assert starts[1] % 20 == 0 or starts[1] in run.steps, starts  # a periodic or a kept checkpoint
    stable = stable_runs(uri, "lad-kill")
    assert len(stable) == len(ladder.stable) and {r.info.status for r in stable} == {"FINISHED"}
    for run in stable:  # its loss curve holds every window once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps))
    assert not kept_anywhere(storage)


# --- the searcher and the stable run's trial, without a Ray cluster ---

def store(tmp_path) -> tuple[str, str]:
    from pipeline import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, tracking.prepare_store(uri, "lad")


def test_the_searcher_hands_out_stable_runs_first_and_each_branch_once_it_can_start(tmp_path):
    from ray.tune.search import Searcher

    from pipeline.sweep.ladder_search import LadderSearch, jobs_of, release_served
    from pipeline.sweep.ladder_trial import stable_checkpoints

    sweep = sweep_config(budgets=[1e11, 1e12], models=["cpu-9k", "cpu-33k"], sizes=None)
    ladder = plan_ladder(grid(sweep))
    everything = {b.point.spec.run_hash for b in ladder.branches}
    work = ladder_work(ladder, everything, kept=lambda r: set(), resumable=lambda p: False)
    search = LadderSearch(jobs_of(work), str(tmp_path), *store(tmp_path))
    first, second = (search.suggest(t) for t in ("s1", "s2"))
    assert {first["ladder"]["role"], second["ladder"]["role"]} == {"stable"}
    assert first["ladder"]["needed"][-1] * 8 * 128 >= second["ladder"]["needed"][-1] * 8 * 128  # longest first
    assert search.suggest("b1") is None  # no checkpoint yet: the branches wait
    run = next(r for r in ladder.stable if r.run_hash == first["ladder"]["run_hash"])
    folder = stable_checkpoints(tmp_path, run.run_hash)
    (folder / kept_checkpoints.tag(run.steps[0])).mkdir(parents=True)
    kept_checkpoints.mark(folder, run.steps[0])
    branch = search.suggest("b1")
    assert branch["spec"] == run.branches[0].point.spec.to_dict()
    assert branch["start"]["from"] == str(folder / kept_checkpoints.tag(run.steps[0]))
    assert branch["start"]["tags"] == {"isoflop.ladder.branch_of": run.run_hash,
                                       "isoflop.ladder.branch_step": str(run.steps[0])}
    search.on_trial_complete("s1")  # the stable run ended without its second checkpoint (it failed)
    assert search.suggest("b2") is None and [j.branch for j in search.blocked] == [run.branches[1]]
    search.on_trial_complete("b1")  # not finished in MLflow: its checkpoint stays
    assert kept_checkpoints.kept_steps(folder) == {run.steps[0]}
    assert release_served(run, str(tmp_path), {run.branches[0].point.spec.run_hash}) == [run.steps[0]]
    assert kept_checkpoints.kept_steps(folder) == set()
    search.on_trial_complete("s2", {"status": "diverged"})  # the other diverged: nothing can start, nothing runs
    assert search.suggest("b3") == Searcher.FINISHED and len(search.blocked) == 3
    assert search.diverged == {second["ladder"]["run_hash"]}


def test_a_stable_trial_resumes_after_a_kill_and_keeps_only_its_branch_checkpoints(corpus, tmp_path, capsys,
                                                                                 one_torch_thread):
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.grid import GridPoint
    from pipeline.sweep.ladder_trial import StableJob, train_stable
    from pipeline.sweep.schema import Resources
    from pipeline.sweep.trial import SweepContext
    from pipeline.training.loop import train

    run = plan_ladder([GridPoint(spec, spec.plan(512)) for spec in (point(30), point(50))]).stable[0]
    assert run.steps == (24, 40)
    uri, experiment = store(tmp_path)
    context = SweepContext("lad", uri, experiment, None, str(corpus), str(tmp_path), Resources(), (), quiet=False)
    job = StableJob(run.run_hash, run.run_name, run.warmup, run.steps)
    folder = job.checkpoints(tmp_path)
    # a first trial killed after its checkpoint at step 16
    assert train(run.spec, corpus, folder.parent, stop_at=16, verbose=False) is None
    assert kept_checkpoints.latest_step(folder) == 16 and not kept_checkpoints.kept_steps(folder)
    reports = []
    assert train_stable(run.spec, job, context, reports.append) == {"status": "finished"}
    assert f"[{run.run_name}] stable run: {run.spec.run_name}'s steps to 40, keeping checkpoints at 24, 40; " \
           "from step 16" in capsys.readouterr().out
    assert {p.name for p in folder.glob("step*")} == {kept_checkpoints.tag(24), kept_checkpoints.tag(40)}
    assert reports and all(r["steps"] == 40 for r in reports)  # the board counts its steps to its end
    mlflow = MlflowClient(uri).search_runs([experiment], f"tags.`isoflop.ladder.stable` = '{run.run_hash}'")
    assert len(mlflow) == 1 and mlflow[0].info.status == "FINISHED" and "isoflop.run_hash" not in mlflow[0].data.tags
    steps = [m.step for m in MlflowClient(uri).get_metric_history(mlflow[0].info.run_id, "loss")]
    assert steps == list(range(17, 41))  # log_every=1, from the step after the checkpoint
    # its first branch's checkpoint went (its branches finished), then a rerun needs it again: from the start, since
    # the only checkpoint left is later; the later kept one is not rewritten
    kept_checkpoints.drop(folder, 24)
    later = (folder / kept_checkpoints.tag(40) / kept_checkpoints.MARKER).stat().st_mtime_ns
    assert train_stable(run.spec, StableJob(run.run_hash, run.run_name, run.warmup, (24,)), context, reports.append)
    assert "from step 0" in capsys.readouterr().out
    assert kept_checkpoints.kept_steps(folder) == {24, 40}
    assert (folder / kept_checkpoints.tag(40) / kept_checkpoints.MARKER).stat().st_mtime_ns == later


def test_the_live_table_shows_stable_runs_and_branches(tmp_path):
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from pipeline.sweep.ladder_search import LadderSearch, jobs_of
    from pipeline.sweep.progress import SweepBoard, SweepProgress

    ladder = plan_ladder(grid(sweep_config(budgets=[1e11, 1e12], models=["cpu-9k"], sizes=None)))
    work = ladder_work(ladder, {b.point.spec.run_hash for b in ladder.branches}, kept=lambda r: set(),
                       resumable=lambda p: False)
    search = LadderSearch(jobs_of(work), str(tmp_path), "unused", "unused")
    board = SweepBoard.of_states("lad", {job.key: job.state() for job in search.waiting})
    screen = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    progress = SweepProgress(board, tmp_path, console=screen, draw_every=0.0)
    progress.setup()
    stable = SimpleNamespace(trial_id="s", config=search.suggest("s"), last_result={})
    run = ladder.stable[0]  # its first checkpoint is there: its first branch starts
    folder = stable_folder(tmp_path, run)
    (folder / kept_checkpoints.tag(run.steps[0])).mkdir(parents=True)
    kept_checkpoints.mark(folder, run.steps[0])
    branch = SimpleNamespace(trial_id="b", config=search.suggest("b"), last_result={})
    for trial in (stable, branch):
        progress.on_trial_start(0, [stable, branch], trial)
    progress.on_trial_result(0, [], stable, {"step": 300, "steps": run.end, "loss": 3.1, "tokens": 3e5,
                                             "tokens_per_s": 1e4})
    first = run.steps[0]
    progress.on_trial_result(0, [], branch, {"step": first + 10, "steps": run.branches[0].point.plan.steps,
                                             "loss": 3.3, "tokens": 1e5, "tokens_per_s": 1e4})
    progress.on_step_end(1, [])
    progress.on_experiment_end([])
    out = screen.file.getvalue()
    assert re.search(rf"cpu-9k\s+stable\s+300/{run.end}", out)
    assert re.search(rf"cpu-9k\s+1e\+11\s+branch from {first}\s+{first + 10}/", out)
    # the branch has done 10 of its steps, the stable run 300 of its: FLOPs weighted by what each trains
    assert board.points[run.run_hash].flops_done == pytest.approx(run.flops * 300 / run.end)


def stable_folder(root, run):
    from pipeline.sweep.ladder_trial import stable_checkpoints

    return stable_checkpoints(root, run.run_hash)
