"""A sweep file's `deepspeed:` block: passed to the engine, checked before any compute, identity only where it
can change a run's numbers."""
import pytest
import torch
import yaml

from pipeline.data.synthetic import synthetic
from pipeline.errors import SweepError
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.sweep.grid import expand_grid, load_sweep
from pipeline.sweep.schema import SweepConfig
from pipeline.training.loop import ONE_RANK_ZERO, Reporter, deepspeed_config, train
from pipeline.training.run_folder import RunFolder, read_weights

BASE = RunSpec(family="mdm", shape="cpu-16k", budget=1e11, train=TrainConfig(seq_len=32, batch_size=8))


def with_block(block: dict) -> RunSpec:
    return BASE.model_copy(update={"train": BASE.train.with_overrides({"deepspeed": block})})


def test_speed_settings_keep_the_run_and_numeric_ones_make_a_new_one():
    speed = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7}, "wall_clock_breakdown": True}
    assert with_block(speed).run_hash == BASE.run_hash
    assert with_block({"communication_data_type": "bf16"}).run_hash != BASE.run_hash
    assert with_block({"zero_optimization": {"zero_quantized_gradients": True}}).run_hash != BASE.run_hash


def test_the_engine_gets_the_block_merged_with_the_recipes_settings():
    recipe = TrainConfig(zero_stage=2, deepspeed={"zero_optimization": {"overlap_comm": True}, "steps_per_print": 10})
    config = deepspeed_config(recipe, micro=4, accumulation=2, bf16=False, world=2)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert config["steps_per_print"] == 10 and config["train_batch_size"] == recipe.batch_size
    one_rank = deepspeed_config(recipe, micro=4, accumulation=4, bf16=False, world=1)["zero_optimization"]
    assert one_rank == {"stage": 2, "overlap_comm": True, "contiguous_gradients": False, "reduce_scatter": False}
    staged = TrainConfig(deepspeed={"zero_optimization": {"contiguous_gradients": True}})
    staged_config = deepspeed_config(staged, micro=4, accumulation=4, bf16=False, world=1)
    assert staged_config["zero_optimization"]["contiguous_gradients"] is True


class Losses(Reporter):
    def __init__(self):
        self.losses = []

    def metrics(self, rows):
        self.losses += [r["loss"] for r in rows]


@pytest.mark.parametrize("zero,precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_the_one_rank_settings_change_no_bit_of_a_run(tmp_path, zero, precision):
    """They only skip gradient staging that one rank has no use for: losses and weights match DeepSpeed's defaults."""
    data = synthetic(tmp_path / "data", tokens=100_000, seed=0).path
    recipe = TrainConfig(seq_len=32, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_min_steps=5, eval_samples=2,
                      val_blocks=4, log_every=1, checkpoint_every=0, zero_stage=zero, precision=precision)
    spec = RunSpec(family="mdm", shape="cpu-26k", budget=6 * 26_000 * 8 * 32 * 25, train=recipe)
    ds_defaults = {"zero_optimization": {key: not value for key, value in ONE_RANK_ZERO.items()}}
    deepspeed_spec = spec.model_copy(update={"train": recipe.with_overrides({"deepspeed": ds_defaults})})
    runs = []
    for name, run_spec in [("ours", spec), ("deepspeed", deepspeed_spec)]:
        losses = Losses()
        result = train(run_spec, data, tmp_path / name, reporter=losses, verbose=False)
        runs.append((losses.losses, result.val_loss, read_weights(RunFolder(tmp_path / name).weights)))
    (ours, our_val, our_weights), (theirs, their_val, their_weights) = runs
    assert len(ours) >= 20 and ours == theirs and our_val == their_val
    assert all(torch.equal(our_weights[name], their_weights[name]) for name in their_weights)


@pytest.mark.parametrize("block,message", [
    ({"overlap_com": True}, "'overlap_com' is not a DeepSpeed setting isoflop passes through"),
    ({"zero_optimization": {"overlap_com": True}}, "zero_optimization.overlap_com: Extra inputs are not permitted"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage is set by train.zero_stage"),
    ({"gradient_clipping": 0.5}, "gradient_clipping is set by train.grad_clip"),
    ({"zero_optimization": {"reduce_bucket_size": "big"}}, "zero_optimization.reduce_bucket_size"),
])
def test_bad_blocks_are_refused_naming_the_key(tmp_path, block, message):
    raw = {"name": "x", "data": str(tmp_path), "families": ["arm"], "budgets": [1e10], "models": ["cpu-16k"],
           "deepspeed": block}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match="deepspeed") as err:
        load_sweep(path)
    assert message in str(err.value)


def test_a_sweep_passes_its_block_to_every_run(tmp_path):
    sweep = SweepConfig(name="x", data={"path": str(tmp_path)}, families=["arm", "mdm"], budgets=[1e10],
                        models=["cpu-16k"], train={"seq_len": 32, "batch_size": 8},
                        deepspeed={"zero_optimization": {"overlap_comm": True}})
    points, _ = expand_grid(sweep, vocab_size=512)
    assert {p.spec.train.deepspeed["zero_optimization"]["overlap_comm"] for p in points} == {True}
    plain = sweep.model_copy(update={"deepspeed": {}})
    assert [p.spec.run_hash for p in points] == [p.spec.run_hash for p in expand_grid(plain, vocab_size=512)[0]]
    with pytest.raises(ValueError, match="top-level `deepspeed:` block"):
        SweepConfig(name="x", data={"path": str(tmp_path)}, families=["arm"], budgets=[1e10], models=["cpu-16k"],
                    train={"deepspeed": {"steps_per_print": 10}})
