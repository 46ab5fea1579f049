"""Searched recipe keys: a sweep file's `train:` lists and sampled spaces become variants of every grid point,
each its own run (hash, MLflow run), resolved the same way on every load."""
import pytest
from mlflow.tracking import MlflowClient
from helpers import TRAIN, assert_one_finished_run_per_point, isoflop, write_sweep

from pipeline import tracking
from pipeline.errors import SweepError
from pipeline.mlflow_keys import VARIANT_TAG
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.sweep.grid import expand_grid, format_grid, load_sweep
from pipeline.sweep.schema import variant_label

LOGUNIFORM = {"loguniform": [1e-3, 1e-2], "samples": 4}


def grid(tmp_path, name="s", **train):
    return expand_grid(load_sweep(write_sweep(tmp_path, name=name, train={**TRAIN, **train})), vocab_size=512)[0]


def test_a_list_runs_every_value_as_its_own_run(tmp_path):
    plain = grid(tmp_path, "plain")
    points = grid(tmp_path, lr=[1e-3, 2e-3, 4e-3])
    assert len(points) == 3 * len(plain) == 24
    assert len({p.spec.run_hash for p in points}) == 24
    assert sorted({p.spec.train.lr for p in points}) == [1e-3, 2e-3, 4e-3]
    assert {p.variant for p in points} == {"lr=0.001", "lr=0.002", "lr=0.004"}
    table = format_grid(points)
    assert "variant" in table.splitlines()[0] and "lr=0.004" in table and "3 recipe variants" in table


def test_sampled_values_are_drawn_in_bounds_distinct_and_the_same_on_every_load(tmp_path):
    lrs = [p.spec.train.lr for p in grid(tmp_path, lr=LOGUNIFORM) if p.spec.family == "arm" and p.spec.budget == 4e9
           and p.spec.shape.label == "cpu-26k"]
    assert len(lrs) == len(set(lrs)) == 4 and all(1e-3 <= lr <= 1e-2 for lr in lrs)
    assert all(float(f"{lr:.4g}") == lr for lr in lrs)  # the variant label is the exact value
    assert [p.spec.run_hash for p in grid(tmp_path, lr=LOGUNIFORM)] == [p.spec.run_hash for p in grid(tmp_path, "again", lr=LOGUNIFORM)]
    # more samples keep the first draws, and another searched key leaves them alone: finished runs stay finished
    assert set(lrs) < {p.spec.train.lr for p in grid(tmp_path, "more", lr={**LOGUNIFORM, "samples": 6})}
    assert set(lrs) == {p.spec.train.lr for p in grid(tmp_path, "wd", lr=LOGUNIFORM, weight_decay=[0.0, 0.1])}
    reseeded = load_sweep(write_sweep(tmp_path, name="seed1", train={**TRAIN, "lr": LOGUNIFORM}, search_seed=1))
    assert not set(lrs) & {p.spec.train.lr for p in expand_grid(reseeded, 512)[0]}


def test_searched_keys_combine_as_a_cross_product(tmp_path):
    points = grid(tmp_path, lr=[1e-3, 2e-3], warmup_fraction={"uniform": [0.01, 0.1], "samples": 3},
                  t_sampling=["stratified", "iid"])
    variants = {p.variant for p in points}
    assert len(variants) == 12 and len(points) == 8 * 12
    assert all(v.startswith("lr=") and ",t_sampling=" in v and ",warmup_fraction=0.0" in v for v in variants)
    assert all(0.01 <= p.spec.train.warmup_fraction <= 0.1 for p in points)


def test_a_sweep_without_a_search_keeps_its_hashes(tmp_path):
    """The grid as the code before searched keys built it: seed over the recipe, nothing else."""
    sweep = load_sweep(write_sweep(tmp_path, seeds=[0, 1]))
    recipe = sweep.train.with_overrides({"flops_convention": sweep.flops_convention})
    before = {RunSpec(family=f, shape=m, budget=b, train=recipe.with_overrides({"seed": s})).run_hash
              for f in sweep.families for b in sweep.budgets for m in sweep.models for s in sweep.seeds}
    points = expand_grid(sweep, 512)[0]
    assert {p.spec.run_hash for p in points} == before and len(points) == 16
    assert {p.variant for p in points} == {""} and "variant" not in format_grid(points)
    # a one-value list is the same run as the plain value
    assert ({p.spec.run_hash for p in grid(tmp_path, "one", lr=[TRAIN["lr"]])}
            == {p.spec.run_hash for p in points if p.spec.train.seed == 0})


@pytest.mark.parametrize("train, message", [
    ({"lr": [1e-3, -1]}, r"train.lr: Input should be greater than 0 \(got -1\)"),
    ({"lrr": [1e-3, 2e-3]}, r"train.lrr: unknown key \(did you mean 'lr'\?\)"),
    ({"lr": []}, "train.lr: the list of values is empty"),
    ({"lr": [1e-3, 1e-3]}, "train.lr: 0.001 is listed twice"),
    ({"lr": {"loguniform": [0, 1e-2], "samples": 2}}, r"train.lr: loguniform needs 0 < lo < hi \(got \[0, 0.01\]\)"),
    ({"lr": {"loguniform": [1e-2, 1e-3], "samples": 2}}, r"train.lr: loguniform needs 0 < lo < hi \(got \[0.01, 0.001\]\)"),
    ({"lr": {"uniform": [1e-3, 1e-3], "samples": 2}}, r"train.lr: uniform needs lo < hi \(got \[0.001, 0.001\]\)"),
    ({"lr": {"loguniform": [1e-3, 1e-2], "samples": 0}}, r"train.lr.samples: Input should be greater than or equal to 1 \(got 0\)"),
    ({"lr": {"loguniform": [1e-3, 1e-2]}}, "train.lr: loguniform needs samples: k"),
    ({"lr": {"logunifrom": [1e-3, 1e-2], "samples": 2}}, r"train.lr: unknown key 'logunifrom' \(did you mean 'loguniform'\?\)"),
    ({"lr": {}}, r"train.lr: give a list of values, \{loguniform"),
    ({"min_lr_ratio": {"uniform": [0.5, 2], "samples": 2}}, r"train.min_lr_ratio: Input should be less than or equal to 1 \(got 2.0\)"),
    ({"warmup_min_steps": {"uniform": [1, 9], "samples": 2}}, "train.warmup_min_steps: uniform draws real numbers"),
    ({"seed": [1, 2]}, "train.seed: cannot be searched: each run's seed comes from the sweep's `seeds:` list"),
    ({"log_every": [1, 2]}, "train.log_every: cannot be searched"),
])
def test_bad_searches_are_named_with_field_and_value(tmp_path, train, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, train={**TRAIN, **train}))


def test_a_range_too_narrow_for_its_samples_is_refused_before_anything_runs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, train={**TRAIN, "lr": {"uniform": [1e-3, 1.0001e-3], "samples": 3}}))
    with pytest.raises(SweepError, match=r"train.lr: \[0.001, 0.0010001\] holds fewer than 3 distinct values"):
        expand_grid(sweep, 512)


def test_the_variant_tag_names_the_searched_values(tmp_path):
    train = TrainConfig(lr=0.003538, warmup_fraction=0.05, t_sampling="iid")
    assert variant_label(train, ["warmup_fraction", "lr"]) == "lr=0.003538,warmup_fraction=0.05"
    assert variant_label(train, ["t_sampling"]) == "t_sampling=iid" and variant_label(train, []) == ""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = tracking.prepare_store(uri, "tags")
    searched = RunSpec(family="arm", shape="cpu-26k", budget=4e9, train=train)
    plain = RunSpec(family="arm", shape="cpu-26k", budget=4e9)
    logged = {spec.run_hash: tracking.RunLogger(uri, experiment, spec, variant=variant).run_id
              for spec, variant in ((searched, variant_label(train, ["lr"])), (plain, ""))}
    client = MlflowClient(uri)
    assert client.get_run(logged[searched.run_hash]).data.tags[VARIANT_TAG] == "lr=0.003538"
    assert client.get_run(logged[plain.run_hash]).data.tags[VARIANT_TAG] == ""


@pytest.mark.slow
def test_two_lr_variants_of_one_point_become_two_finished_runs(tmp_path):
    path = write_sweep(tmp_path, name="mini-lr", families=["arm"], budgets=[4e9], models=["cpu-26k"],
                       train={**TRAIN, "lr": [2e-3, 4e-3]})
    proc = isoflop("sweep", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, runs = assert_one_finished_run_per_point(uri, "mini-lr", 2)
    assert sorted(r.data.tags[VARIANT_TAG] for r in runs) == ["lr=0.002", "lr=0.004"]
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.002", "0.004"]
    again = isoflop("sweep", str(path))
    assert again.returncode == 0 and "2 finished" in again.stdout and "0 to run" in again.stdout


@pytest.mark.parametrize("overrides, message", [
    ({"train": {**TRAIN, "seed": 3407}}, r"train.seed: 3407 and seeds: \[0\] both set the runs' seed and disagree; "
                                         r"give it once, as seeds: \[3407\]"),
    ({"train": {**TRAIN, "seed": 1}, "seeds": [1, 2]}, r"train.seed: 1 and seeds: \[1, 2\]"),
    ({"train": {**TRAIN, "flops_convention": "palm"}}, "train.flops_convention: palm and flops_convention: 6ND disagree"),
])
def test_seed_and_flops_convention_are_set_in_one_place(tmp_path, overrides, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, **overrides))


def test_seed_and_flops_convention_given_twice_alike_are_accepted(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, train={**TRAIN, "seed": 5, "flops_convention": "palm"}, seeds=[5],
                                   flops_convention="palm"))
    assert {p.spec.train.seed for p in expand_grid(sweep, 512)[0]} == {5}
