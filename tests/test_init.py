"""Initial weights: SMDM's size-aware rule by default, N(0, 0.02) for runs made before the rule."""
import math

import pytest
import torch

from pipeline.model.family import FAMILIES
from pipeline.model.shapes import PAPER_SHAPES, Shape
from pipeline.model.transformer import Transformer, init_std

LARGEST = PAPER_SHAPES["smdm-2121M"]
RESIDUAL_WRITERS = ("attn.proj.weight", "mlp.down.weight")


def measured_stds(shape: Shape, init: str, family: str = "mdm") -> dict[str, float]:
    torch.manual_seed(0)
    model = Transformer(FAMILIES[family].model_config(shape, vocab_size=64, seq_len=16, init=init))
    return {name: w.std().item() for name, w in model.named_parameters() if w.dim() == 2}


@pytest.mark.parametrize("shape", [
    # the largest paper model's width in one block, and its depth at a small width: together every factor of the rule
    Shape(1, LARGEST.n_head, LARGEST.d_model, LARGEST.d_ff),
    Shape(LARGEST.n_layer, 2, 64, 256),
])
def test_smdm_rule_per_module(shape):
    d, layers = shape.d_model, shape.n_layer
    for name, std in measured_stds(shape, "smdm").items():
        writes_residual = name.endswith(RESIDUAL_WRITERS)
        expected = 1 / (math.sqrt(d) * layers) if writes_residual else math.sqrt(2 / (5 * d))
        assert init_std(name, shape, "smdm") == pytest.approx(expected)
        assert std == pytest.approx(expected, rel=0.03), name  # thousands of draws per matrix at least


def test_the_rule_at_the_largest_paper_shape():
    """The values a 2121M model starts from (the rule, without building 2B parameters)."""
    assert init_std("blocks.27.mlp.down.weight", LARGEST, "smdm") == pytest.approx(1 / (math.sqrt(2176) * 28))
    assert init_std("head.weight", LARGEST, "smdm") == pytest.approx(math.sqrt(2 / (5 * 2176)))
    assert init_std("embed.weight", LARGEST, "smdm") == init_std("blocks.0.attn.qkv.weight", LARGEST, "smdm")


def test_old_runs_initialisation_is_unchanged(monkeypatch):
    """normal_0.02 draws the same numbers as before the rule existed, so those runs reproduce bit for bit."""
    shape = Shape(2, 2, 32, 128)
    config = FAMILIES["arm"].model_config(shape, vocab_size=64, seq_len=16, init="normal_0.02")
    torch.manual_seed(0)
    model = Transformer(config)
    torch.manual_seed(0)
    with monkeypatch.context() as patch:  # the modules as built, before any initialisation of ours
        patch.setattr(Transformer, "init_weights", lambda self: None)
        reference = Transformer(config)
    for module in reference.modules():  # the previous code's initialisation: Module.apply's order
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    assert all(abs(s - 0.02) < 0.002 for s in measured_stds(shape, "normal_0.02", "arm").values())
