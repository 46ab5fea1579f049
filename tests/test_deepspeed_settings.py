"""A sweep file's `deepspeed:` block: passed to the engine, checked before any compute, identity only where it
can change a run's numbers."""
import pytest
import yaml

from pipeline.config import RunSpec, SweepConfig, TrainConfig
from pipeline.errors import SweepError
from pipeline.grid import expand_grid, load_sweep
from pipeline.train import deepspeed_config

BASE = RunSpec(family="mdm", shape="cpu-16k", budget=1e11, train=TrainConfig(seq_len=32, batch_size=8))


def with_block(block: dict) -> RunSpec:
    return BASE.model_copy(update={"train": BASE.train.with_overrides({"deepspeed": block})})


def test_speed_settings_keep_the_run_and_numeric_ones_make_a_new_one():
    speed = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7}, "wall_clock_breakdown": True}
    assert with_block(speed).run_hash == BASE.run_hash
    assert with_block({"communication_data_type": "bf16"}).run_hash != BASE.run_hash
    assert with_block({"zero_optimization": {"zero_quantized_gradients": True}}).run_hash != BASE.run_hash


def test_the_engine_gets_the_block_merged_with_the_recipes_settings():
    cfg = TrainConfig(zero_stage=2, deepspeed={"zero_optimization": {"overlap_comm": True}, "steps_per_print": 10})
    config = deepspeed_config(cfg, micro=4, accumulation=2, bf16=False)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert config["steps_per_print"] == 10 and config["train_batch_size"] == cfg.batch_size


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
