"""A run's hash names its MLflow run and its folder: a change that moves it orphans every finished run.

The hashes below were computed by the code that trained the runs users already have; a refactor must
leave them exactly as they are. A deliberate change to what defines a run updates them and says so.
The pinned runs predate `init` (their weights started from N(0, 0.02)), so their specs say init="normal_0.02".
"""
import pytest

from pipeline.recipe import RunSpec, TrainConfig

DEMO_RECIPE = TrainConfig(seq_len=128, batch_size=8, lr=2e-3, min_lr_ratio=0.01, warmup_min_steps=10, min_steps=40,
                          zero_stage=0, eval_samples=16, init="normal_0.02")


@pytest.mark.parametrize("spec, run_hash", [
    (RunSpec(family="mdm", shape="smdm-113M", budget=6e18, train=TrainConfig(init="normal_0.02")), "891a8e4083ac"),
    (RunSpec(family="arm", shape="cpu-16k", budget=1e11, train=DEMO_RECIPE, data_fingerprint="0123456789abcdef"),
     "1a0c8ba2d507"),
    (RunSpec(family="mdm", shape={"n_layer": 2, "n_head": 2, "d_model": 64}, budget=3e12,
             train=TrainConfig(seed=7, flops_convention="palm", t_sampling="iid", init="normal_0.02")), "51ea0c70b530"),
])
def test_run_hash_is_pinned(spec, run_hash):
    assert spec.run_hash == run_hash
    assert spec.run_name.endswith(run_hash)


def test_logging_cadence_and_the_epoch_guard_are_not_identity():
    spec = RunSpec(family="arm", shape="cpu-16k", budget=1e11, train=DEMO_RECIPE)
    chatty = spec.model_copy(update={"train": DEMO_RECIPE.with_overrides({"log_every": 1, "checkpoint_every": 7,
                                                                          "max_epochs": 3.0})})
    assert chatty.run_hash == spec.run_hash


def test_a_new_recipe_key_changes_the_hash_only_when_it_changes_behaviour():
    spec = RunSpec(family="mdm", shape="cpu-16k", budget=1e11, train=DEMO_RECIPE)
    assert spec.model_copy(update={"train": DEMO_RECIPE.with_overrides({"mdm_eval": "time"})}).run_hash == spec.run_hash
    assert spec.model_copy(update={"train": DEMO_RECIPE.with_overrides({"mdm_eval": "count"})}).run_hash != spec.run_hash


def test_the_smdm_initialisation_is_a_different_run():
    old = RunSpec(family="mdm", shape="cpu-16k", budget=1e11, train=DEMO_RECIPE)
    new = old.model_copy(update={"train": DEMO_RECIPE.with_overrides({"init": "smdm"})})
    assert new.run_hash != old.run_hash
    assert TrainConfig().init == "smdm"  # the default: a sweep file that does not say gets SMDM's rule
