"""Unique data as a sweep axis: a point trains on a prefix of the training split holding `unique_tokens`, repeated as
its budget needs; the subset is part of its identity and its epochs are counted against it."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from helpers import TRAIN, write_sweep

from pipeline.data.dataset import TokenDataset, load_dataset
from pipeline.data.synthetic import synthetic
from pipeline.errors import DataError, SweepError
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.sweep.grid import expand_grid, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, PREFIX_BLOCKS = 16, 40
UNIQUE = PREFIX_BLOCKS * (SEQ_LEN + 1) + 5  # 40 whole blocks; the 5 tokens left over are not a block


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_dataset(synthetic(tmp_path_factory.mktemp("syn") / "d", tokens=20_000, val_tokens=3_000, seed=1).path)


def subset_batch(ds, **kw):
    args = dict(step=0, rank=0, world_size=1, batch_size=8, seq_len=SEQ_LEN, seed=3, unique_tokens=UNIQUE)
    return ds.train_batch(**{**args, **kw})


def test_the_subset_is_the_same_prefix_on_every_rank_and_every_rerun(corpus):
    width = SEQ_LEN + 1
    train = np.fromfile(corpus.info.path / "train.bin", dtype=np.uint16).astype(np.int64)
    prefix = {tuple(train[i * width:(i + 1) * width]) for i in range(PREFIX_BLOCKS)}
    steps = 4 * PREFIX_BLOCKS // 8  # four epochs of the subset
    whole = torch.cat([subset_batch(corpus, step=s) for s in range(steps)])
    assert {tuple(row.tolist()) for row in whole} == prefix  # every prefix block, and nothing beyond it
    first_epoch = [tuple(row.tolist()) for row in whole[:PREFIX_BLOCKS]]
    assert len(set(first_epoch)) == PREFIX_BLOCKS  # each block once per epoch
    for world in (2, 4):  # any split of the global batch reads the same blocks in the same order
        split = torch.cat([subset_batch(corpus, step=s, rank=r, world_size=world, batch_size=8 // world)
                           for s in range(steps) for r in range(world)])
        assert torch.equal(split, whole)
    rerun = load_dataset(corpus.info.path)  # a fresh process, a resumed run
    assert torch.equal(torch.cat([subset_batch(rerun, step=s) for s in range(steps)]), whole)


def test_a_subset_the_split_cannot_hold_is_a_data_error_naming_both_sizes(corpus):
    with pytest.raises(DataError, match=r"unique_tokens: 1,000,000 tokens make 58,823 blocks .* holds 1,176 "):
        subset_batch(corpus, unique_tokens=1_000_000)


def test_training_draws_every_batch_from_the_subset(tmp_path, monkeypatch, one_torch_thread):
    from helpers import TINY_RECIPE, TINY_SHAPE

    from pipeline.model.flops import budget_for_steps
    from pipeline.training.loop import train

    asked, read = [], TokenDataset.train_batch
    monkeypatch.setattr(TokenDataset, "train_batch",
                        lambda self, **kw: asked.append(kw["unique_tokens"]) or read(self, **kw))
    data = synthetic(tmp_path / "data", tokens=50_000, seed=0).path
    budget = budget_for_steps(TINY_SHAPE, 40, batch_size=TINY_RECIPE.batch_size, seq_len=TINY_RECIPE.seq_len)
    spec = RunSpec(family="arm", shape=TINY_SHAPE, budget=budget,
                   train=TINY_RECIPE.with_overrides({"unique_tokens": 3_300}))
    with pytest.raises(DataError, match=r"train.max_epochs: .* 3.2 epochs of the unique_tokens=3,300 subset's 100"):
        train(spec, data, tmp_path / "refused", verbose=False)  # before a step is taken
    allowed = spec.model_copy(update={"train": spec.train.with_overrides({"max_epochs": 4})})
    assert train(allowed, data, tmp_path / "run", verbose=False).steps == 40 and asked == [3_300] * 40


def test_the_subset_is_part_of_a_runs_identity():
    recipe = TrainConfig(seq_len=128, batch_size=8, init="normal_0.02")
    whole = RunSpec(family="arm", shape="cpu-16k", budget=1e11, train=recipe)
    assert "unique_tokens" not in whole.identity()["train"]  # runs before the key keep their hashes
    small, large = (whole.model_copy(update={"train": recipe.with_overrides({"unique_tokens": u})})
                    for u in (250_000, 1_000_000))
    assert len({whole.run_hash, small.run_hash, large.run_hash}) == 3
    with pytest.raises(ValueError, match=r"unique_tokens=100 holds no training block of seq_len\+1=129"):
        recipe.with_overrides({"unique_tokens": 100})


def test_a_sweep_trains_every_point_on_each_unique_data_size(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, families=["arm"], budgets=[4e9], models=["cpu-26k"],
                                   unique_tokens=[3_300, 20_000], train={**TRAIN, "max_epochs": 20}))
    points, dropped = expand_grid(sweep, vocab_size=512, train_blocks=6_000)
    assert not dropped and [p.spec.train.unique_tokens for p in points] == [3_300, 20_000]
    assert points[0].spec.run_hash != points[1].spec.run_hash
    sequences = points[0].plan.steps * TRAIN["batch_size"]  # the same tokens for both: D does not depend on U
    assert [p.plan.epochs for p in points] == pytest.approx([sequences / 100, sequences / 606])  # U // 33 blocks


def test_a_point_repeating_its_subset_beyond_max_epochs_is_refused_as_before(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, families=["arm"], budgets=[4e9], models=["cpu-26k"],
                                   unique_tokens=[3_300]))
    with pytest.raises(SweepError) as err:
        expand_grid(sweep, vocab_size=512, train_blocks=6_000)
    assert "train.max_epochs: arm cpu-26k at 4e+09 FLOPs" in str(err.value)
    assert "epochs of the unique_tokens=3,300 subset's 100, above train.max_epochs=1" in str(err.value)


def test_a_subset_larger_than_the_corpus_is_refused_before_any_compute(tmp_path, capsys):
    path = write_sweep(tmp_path, budgets=[4e9], unique_tokens=[10_000_000], train={**TRAIN, "max_epochs": 1e6})
    code, _, err = cli(capsys, "sweep", path, "--dry-run")
    assert code == 2
    assert err.count("train.unique_tokens: 10,000,000 tokens (303,030 blocks of seq_len+1=33) is more than the "
                     "corpus's training split holds: 6,060 blocks (199,980 tokens)") == 1, err


def test_the_dry_run_shows_each_points_unique_data(tmp_path, capsys):
    path = write_sweep(tmp_path, budgets=[4e9], models=["cpu-26k"], unique_tokens=[3_300, 20_000],
                       train={**TRAIN, "max_epochs": 20})
    code, out, err = cli(capsys, "sweep", path, "--dry-run")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith(("mdm", "arm"))]
    assert "U (tokens)" in out and sorted(row[7] for row in rows) == ["20,000", "20,000", "3,300", "3,300"]


@pytest.mark.parametrize("change, message", [
    ({"unique_tokens": [3_300, 3_300]}, "unique_tokens: 3300 is listed twice"),
    ({"unique_tokens": [20]}, "unique_tokens: 20 holds no training block of seq_len+1=33 tokens"),
    ({"unique_tokens": [3_300], "train": {**TRAIN, "unique_tokens": 3_300}}, "both set the runs' unique data"),
    ({"train": {**TRAIN, "unique_tokens": [3_300, 20_000]}}, "train.unique_tokens: cannot be searched"),
    ({"unique_tokens": [3_300], "models": None, "sizes": {"adapt": True}}, "makes one per unique-data size"),
])
def test_bad_unique_data_settings_are_refused_naming_the_field(tmp_path, change, message):
    with pytest.raises(SweepError, match=re.escape(message)):
        load_sweep(write_sweep(tmp_path, **change))


def test_the_data_constrained_sweep_file_plans_both_families_from_1_to_64_epochs():
    sweep = load_sweep(ROOT / "sweeps" / "data_constrained.yaml")
    points, dropped = expand_grid(sweep, vocab_size=512, train_blocks=sweep.data.synthetic.tokens // 129)
    assert {p.spec.family for p in points} == {"arm", "mdm"} and len(sweep.unique_tokens) >= 2
    epochs = [p.plan.epochs for p in points]
    assert min(epochs) < 1 and 64 <= max(epochs) <= sweep.train.max_epochs
    assert len(points) == 66 and len(dropped) == 6
