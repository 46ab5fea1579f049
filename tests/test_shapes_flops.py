import csv
import math

import pytest

from pipeline.cli import main
from pipeline.errors import BudgetError, ConfigError
from pipeline.model.family import FAMILIES
from pipeline.model.flops import budget_for_steps, flops_per_token, matmul_params, plan_budget
from pipeline.model.shapes import CPU16_SHAPES, CPU_SHAPES, PAPER_SHAPES, REGISTRY, Shape, resolve_shape
from pipeline.model.transformer import Transformer


def test_paper_shapes_match_reference_counts(reference_dir):
    with open(reference_dir / "smdm_model_configs.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert len(rows) == 30
    for row in rows:
        shape = PAPER_SHAPES["smdm-" + row["config_name"].removeprefix("Diff_LLaMA_")]
        assert (shape.n_layer, shape.n_head, shape.d_model, shape.d_ff) == (
            int(row["n_layer"]), int(row["n_head"]), int(row["n_embd"]), int(row["intermediate_size"]))
        assert shape.non_embedding_params() == round(float(row["nonemb_params_M"]) * 1e6)


def test_models_csv_reproduces_reference(reference_dir, capsys):
    assert main(["models", "--format", "csv"]) == 0
    printed = {line.split(",")[0]: int(line.split(",")[-1]) for line in capsys.readouterr().out.splitlines()[1:]}
    with open(reference_dir / "smdm_model_configs.csv") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            name = "smdm-" + row["config_name"].removeprefix("Diff_LLaMA_")
            assert printed[name] == round(float(row["nonemb_params_M"]) * 1e6)


def test_cpu_ladder_spans_300_to_5m_and_grows():
    sizes = [s.non_embedding_params() for s in CPU_SHAPES.values()]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) == len(CPU_SHAPES)  # no two share a name
    assert 200 <= sizes[0] and sizes[-1] <= 5_000_000
    assert max(b / a for a, b in zip(sizes, sizes[1:])) < 2.5  # fine enough for a parabola per budget


def test_cpu16_ladder_keeps_heads_16_wide_or_one_head():
    sizes = [s.non_embedding_params() for s in CPU16_SHAPES.values()]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) == len(CPU16_SHAPES)
    assert sizes[0] < 100 and sizes[-1] <= 5_000_000
    assert max(b / a for a, b in zip(sizes[1:], sizes[2:])) < 2.5  # above the width-2 shape, as fine as the cpu ladder
    for shape in CPU16_SHAPES.values():
        assert shape.n_head == 1 if shape.d_model < 32 else shape.head_size in range(16, 32), shape


@pytest.mark.parametrize("name", ["cpu-26k", "cpu-1.3M", "smdm-6M"])
@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_model_parameter_counts_match_formula(name, family):
    shape = REGISTRY[name]
    model = Transformer(FAMILIES[family].model_config(shape, vocab_size=300, seq_len=32))
    assert model.non_embedding_params() == shape.non_embedding_params()
    assert model.total_params() == shape.non_embedding_params() + shape.embedding_params(300, mask_token=family == "mdm")


def test_inline_shapes():
    shape = resolve_shape("{n_layer: 2, n_head: 2, d_model: 64}")
    assert (shape.n_layer, shape.d_ff) == (2, 256)
    assert resolve_shape({"n_layer": 1, "n_head": 4, "d_model": 64, "d_ff": 100}).d_ff == 100
    with pytest.raises(ConfigError, match="n_head=3 does not divide d_model=64"):
        resolve_shape({"n_layer": 1, "n_head": 3, "d_model": 64})
    with pytest.raises(ConfigError, match="did you mean 'cpu-26k'"):
        resolve_shape("cpu-26K")
    with pytest.raises(ConfigError, match="unknown keys"):
        resolve_shape({"n_layer": 1, "n_head": 2, "d_model": 64, "heads": 2})


def test_flop_conventions():
    shape = Shape(2, 2, 64, 256)
    assert flops_per_token(shape, 100, 32, "6ND") == 6 * shape.non_embedding_params()
    n_matmul = 2 * (4 * 64 * 64 + 3 * 64 * 256) + 64 * 100
    assert matmul_params(shape, 100) == n_matmul
    assert flops_per_token(shape, 100, 32, "palm") == 6 * n_matmul + 12 * 2 * 64 * 32
    with pytest.raises(BudgetError, match="flops_convention"):
        flops_per_token(shape, 100, 32, "7ND")


def test_budget_to_steps_and_minimum():
    shape = REGISTRY["smdm-113M"]
    plan = plan_budget(6e18, shape, vocab_size=32000, seq_len=2048, batch_size=256)
    assert plan.steps == round(6e18 / (6 * shape.non_embedding_params() * 256 * 2048))
    assert math.isclose(plan.flops, 6e18, rel_tol=1 / plan.steps)
    assert plan.tokens == plan.steps * 256 * 2048
    with pytest.raises(BudgetError, match=r"budget: 1e\+10 FLOPs gives 0 steps .* below train.min_steps=20"):
        plan_budget(1e10, shape, vocab_size=32000, seq_len=2048, batch_size=256, min_steps=20)
    with pytest.raises(BudgetError, match="positive"):
        plan_budget(-1.0, shape, vocab_size=32000, seq_len=2048, batch_size=256)


@pytest.mark.parametrize("convention", ["6ND", "palm"])
def test_budget_for_steps_inverts_the_plan(convention):
    shape = REGISTRY["cpu-26k"]
    budget = budget_for_steps(shape, 37, batch_size=8, seq_len=64, vocab_size=512, convention=convention)
    plan = plan_budget(budget, shape, vocab_size=512, seq_len=64, batch_size=8, convention=convention)
    assert plan.steps == 37 and plan.flops == pytest.approx(budget)


def test_a_run_must_outlast_its_warmup():
    from pipeline.recipe import RunSpec, TrainConfig

    recipe = TrainConfig(seq_len=64, batch_size=8, warmup_min_steps=30, min_steps=5)
    shape = REGISTRY["cpu-26k"]
    spec = RunSpec(family="arm", shape=shape, budget=budget_for_steps(shape, 30, batch_size=8, seq_len=64), train=recipe)
    with pytest.raises(BudgetError, match=r"30 steps .* do not outlast the warmup of 30 \(train.warmup_min_steps=30"):
        spec.plan(512)
    assert spec.model_copy(update={"budget": spec.budget * 2}).plan(512).steps == 60
