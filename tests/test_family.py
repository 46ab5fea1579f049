"""The two families: losses, the MDM bound's estimators, attention masks, and that nothing else branches on them."""
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.family import FAMILIES, family_of, mean_and_stderr
from pipeline.model import KVCache, Transformer
from pipeline.noise import MonteCarlo, diffusion_times, generator, masking
from pipeline.shapes import Shape

ARM, MDM = FAMILIES["arm"], FAMILIES["mdm"]

SHAPE = Shape(1, 2, 16, 32)
EPS = 1e-3


def tiny_model(family: str, vocab: int, seq_len: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(FAMILIES[family].model_config(SHAPE, vocab, seq_len))
    with torch.no_grad():  # larger weights than the default init, so predictions differ across masks
        for p in model.parameters():
            p.mul_(20)
    return model.eval()


def analytic_mdm_bound(model: Transformer, x: torch.Tensor, eps: float) -> float:
    """E over t ~ U(0,1) and all 2^L masks of Σ_masked CE / p / L, by enumeration and exact quadrature."""
    L = len(x)
    per_mask = []
    for pattern in itertools.product([False, True], repeat=L):
        masked = torch.tensor(pattern)
        with torch.no_grad():
            logits = model(torch.where(masked, model.mask_token_id, x)[None])[0].double()
        ce = torch.nn.functional.cross_entropy(logits, x, reduction="none")
        per_mask.append((int(masked.sum()), float(ce[masked].sum())))
    # E[loss | p] = Σ_M p^(|M|-1) (1-p)^(L-|M|) Σ_{i in M} CE_i / L, a polynomial in p of degree L-1;
    # t uniform means p uniform on [eps, 1]: Gauss-Legendre with L nodes integrates it exactly.
    nodes, weights = np.polynomial.legendre.leggauss(L + 1)
    p = (1 - eps) / 2 * nodes + (1 + eps) / 2
    f = sum(s * p ** (k - 1) * (1 - p) ** (L - k) for k, s in per_mask if k > 0) / L
    return float((weights * f).sum() / 2)


def test_mdm_estimator_expectation_equals_enumerated_bound():
    vocab, L = 3, 4
    model = tiny_model("mdm", vocab, L)
    x = torch.tensor([0, 2, 1, 1])
    exact = analytic_mdm_bound(model, x, EPS)
    block = torch.cat([torch.tensor([0]), x])[None]
    draws = 40_000
    g = generator(1, 2)
    t, u = torch.rand(draws, generator=g), torch.rand(draws, L, generator=g)
    with torch.no_grad():
        values = MDM.loss(model, block.expand(draws, -1), masking(t, u, EPS)).double()
    mean, se = mean_and_stderr(values)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # the stratified validation estimator targets the same number
    strat = MDM.sequence_losses(model, block, MonteCarlo(samples=draws, seed=5, batch_size=4096))
    assert abs(strat.item() - exact) < 4 * se


def test_uniform_model_scores_log_v_for_both_families():
    vocab, L = 7, 6
    blocks = torch.randint(0, vocab, (5, L + 1), generator=torch.Generator().manual_seed(0))
    for family in ("arm", "mdm"):
        model = tiny_model(family, vocab, L)
        torch.nn.init.zeros_(model.head.weight)  # every prediction uniform
        if family == "arm":
            values = ARM.sequence_losses(model, blocks, MonteCarlo())
            assert torch.allclose(values, torch.full_like(values, math.log(vocab)), atol=1e-6)
        else:
            assert analytic_mdm_bound(model, blocks[0, 1:], EPS) == pytest.approx(math.log(vocab), abs=1e-9)
            draws = 20_000
            g = generator(7)
            with torch.no_grad():
                values = MDM.loss(model, blocks[:1].expand(draws, -1),
                                  masking(torch.rand(draws, generator=g), torch.rand(draws, L, generator=g), EPS)).double()
            mean, se = mean_and_stderr(values)
            assert abs(mean - math.log(vocab)) < 4 * se


def test_stratified_and_iid_times_share_the_mean_and_stratified_has_less_variance():
    n = 256
    strat = torch.stack([diffusion_times(n, generator(s)) for s in range(400)])
    iid = torch.stack([diffusion_times(n, generator(s), stratified=False) for s in range(400)])
    assert strat.mean().item() == pytest.approx(0.5, abs=0.01)
    assert iid.mean().item() == pytest.approx(0.5, abs=0.01)
    assert strat.mean(1).std() < iid.mean(1).std() / 10
    # one shared offset: consecutive times are exactly 1/n apart, covering (0, 1) once
    t = diffusion_times(n, generator(0))
    assert torch.allclose(t.diff(), torch.full((n - 1,), 1 / n), atol=1e-6)


def test_validation_is_reproducible_and_split_invariant():
    model = tiny_model("mdm", 11, 8)
    blocks = torch.randint(0, 11, (6, 9), generator=torch.Generator().manual_seed(1))
    whole = MDM.sequence_losses(model, blocks, MonteCarlo(samples=8, seed=3, batch_size=5))
    again = MDM.sequence_losses(model, blocks, MonteCarlo(samples=8, seed=3, batch_size=16))
    odd = MDM.sequence_losses(model, blocks, MonteCarlo(samples=8, seed=3, batch_size=3), [1, 3, 5])
    assert torch.equal(whole, again)
    assert torch.equal(whole[[1, 3, 5]], odd)
    assert not torch.equal(whole, MDM.sequence_losses(model, blocks, MonteCarlo(samples=8, seed=4)))


def test_mdm_attends_both_ways_arm_causally():
    vocab, L = 13, 8
    x = torch.randint(0, vocab, (1, L), generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % vocab
    for family, future_matters in (("arm", False), ("mdm", True)):
        torch.manual_seed(0)
        model = Transformer(FAMILIES[family].model_config(SHAPE, vocab, L))
        assert family_of(model) is FAMILIES[family]
        with torch.no_grad():
            differs = not torch.equal(model(x)[0, 0], model(changed)[0, 0])
        assert differs == future_matters


def test_kv_cache_matches_full_forward():
    model = tiny_model("arm", 17, 16)
    x = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = KVCache()
    with torch.no_grad():
        pieces = [model(x[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 12))]
        assert torch.allclose(torch.cat(pieces, 1), model(x), atol=1e-5)


def test_training_noise_is_the_global_batch_however_it_is_split():
    """ARM draws none; an MDM's times are one stratified set over the global batch, sliced per micro batch."""
    cfg = TrainConfig(seq_len=16, batch_size=8)
    assert ARM.training_noise(cfg, step=3, shard=0, micro=8) is None
    whole = MDM.training_noise(cfg, step=3, shard=0, micro=8)
    halves = [MDM.training_noise(cfg, step=3, shard=s, micro=4) for s in (0, 1)]
    assert torch.equal(torch.cat([h.p for h in halves]), whole.p)
    assert torch.allclose(whole.p.sort().values.diff(), torch.full((7,), (1 - cfg.mdm_eps) / 8), atol=1e-6)
    assert whole.masked.shape == (8, 16)
    assert not torch.equal(MDM.training_noise(cfg, step=4, shard=0, micro=8).p, whole.p)


# Where a family could be asked for by name or by its attention mask; model.py implements the mask itself.
BRANCH = re.compile(r"""[=!]=\s*["'](arm|mdm)["']|["'](arm|mdm)["']\s*[=!]=|\bin\s*\(["'](arm|mdm)|\.causal\b""")


def test_no_code_outside_the_family_module_branches_on_the_family():
    root = Path(__file__).resolve().parents[1]
    files = [*(root / "pipeline").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    offenders = [f"{path.name}:{n}: {line.strip()}" for path in files if path.name not in ("family.py", "model.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if BRANCH.search(line)]
    assert not offenders, offenders
