"""The two families: losses, the MDM bound's estimators, attention masks, and that nothing else branches on them."""
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model.family import FAMILIES, family_of, mean_and_stderr
from pipeline.model.noise import Masking, MonteCarlo, diffusion_times, draws, generator, mask_counts, masking
from pipeline.model.shapes import Shape
from pipeline.model.transformer import KVCache, Transformer
from pipeline.recipe import TrainConfig

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


def enumerate_masks(model: Transformer, x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """Every one of the 2^L masks of x, with Σ_masked CE under it."""
    out = []
    for pattern in itertools.product([False, True], repeat=len(x)):
        masked = torch.tensor(pattern)
        with torch.no_grad():
            logits = model(torch.where(masked, model.mask_token_id, x)[None])[0].double()
        ce = torch.nn.functional.cross_entropy(logits, x, reduction="none")
        out.append((masked, float(ce[masked].sum())))
    return out


def analytic_mdm_bound(model: Transformer, x: torch.Tensor, eps: float) -> float:
    """E over t ~ U(0,1) and all 2^L masks of Σ_masked CE / p / L, by enumeration and exact quadrature."""
    L = len(x)
    per_mask = [(int(masked.sum()), s) for masked, s in enumerate_masks(model, x)]
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


def test_count_estimator_expectation_equals_the_time_bound_at_eps_zero():
    """LLaDA's form (l uniform on 1..L, a uniform l-subset, weight L/l) has the ε = 0 bound as its exact mean:
    B(l, L−l+1) = 1/(l·C(L,l)), so both enumerations weight a size-l mask alike (docs/method.md §2)."""
    vocab, L = 3, 4
    model = tiny_model("mdm", vocab, L)
    x = torch.tensor([0, 2, 1, 1])
    block = torch.cat([torch.tensor([0]), x])[None]
    masks = [m for m, _ in enumerate_masks(model, x) if m.any()]
    # the estimator's own loss on every (l, subset) draw, p = l/L as count draws set it
    with torch.no_grad():
        values = MDM.loss(model, block.expand(len(masks), -1),
                          Masking(torch.stack(masks), torch.stack([m.sum() / L for m in masks]).float())).double()
    sizes = torch.stack([m.sum() for m in masks])
    expectation = sum(values[sizes == l].mean().item() for l in range(1, L + 1)) / L
    exact = analytic_mdm_bound(model, x, eps=0.0)
    assert expectation == pytest.approx(exact, rel=1e-6, abs=1e-6)
    # the sampled estimator: iid draws give the standard error; the stratified validation mean is held to it too
    n = 40_000
    noise = draws(MonteCarlo(samples=n, seed=2, estimator="count", stratified=False), L, 0)
    with torch.no_grad():
        mean, se = mean_and_stderr(MDM.loss(model, block.expand(n, -1), noise).double())
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    strat = MDM.sequence_losses(model, block, MonteCarlo(samples=n, estimator="count", eval_seed=5, batch_size=4096))
    assert abs(strat.item() - exact) < 4 * se


def test_count_draws_mask_exactly_l_tokens_with_l_stratified():
    L = 16
    for K in (L, 3 * L, 5):
        noise = draws(MonteCarlo(samples=K, seed=1, estimator="count"), L, 7)
        counts = noise.masked.sum(1)
        assert torch.equal(noise.p, counts.float() / L)  # the kernel's 1/p is the weight L/l
        if K % L == 0:  # every count equally often
            assert torch.equal(counts.sort().values, torch.arange(1, L + 1).repeat_interleave(K // L))
    # K < L: spread evenly (gaps of L/K up to rounding), and each draw alone uniform on 1..L
    strat = torch.stack([mask_counts(5, L, generator(s)) for s in range(4000)])
    gaps = strat.sort(1).values.diff(1)
    assert gaps.min() >= L // 5 and gaps.max() <= L // 5 + 1
    freq = torch.bincount(strat[:, 0] - 1, minlength=L).double() / len(strat)
    assert (freq - 1 / L).abs().max() < 4 * math.sqrt(1 / L / len(strat))
    # the masked l-subset is uniform: every position masked with probability l/L
    positions = draws(MonteCarlo(samples=20_000, seed=3, estimator="count", stratified=False), L, 0)
    share = (positions.masked / positions.masked.sum(1, keepdim=True)).mean(0)
    assert torch.allclose(share, torch.full((L,), 1 / L), atol=0.003)


def test_time_draws_are_unchanged_by_the_count_estimator():
    """Finished runs' validation numbers must not move: "time" draws are today's, bit for bit."""
    mc = MonteCarlo(samples=8, seed=3)
    g = generator(3, 5)
    t = diffusion_times(8, g)
    expected = masking(t, torch.rand(8, 12, generator=g), mc.eps)
    got = draws(mc, 12, 5)
    assert torch.equal(got.masked, expected.masked) and torch.equal(got.p, expected.p)


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


@pytest.mark.parametrize("estimator", ["time", "count"])
def test_validation_is_reproducible_and_split_invariant(estimator):
    model = tiny_model("mdm", 11, 8)
    blocks = torch.randint(0, 11, (6, 9), generator=torch.Generator().manual_seed(1))

    def losses(batch_size=5, indices=None, **seeds):
        mc = MonteCarlo(samples=8, batch_size=batch_size, estimator=estimator, **{"seed": 3, **seeds})
        return MDM.sequence_losses(model, blocks, mc, indices)

    whole = losses()
    assert torch.equal(whole, losses(batch_size=16))
    assert torch.equal(whole[[1, 3, 5]], losses(batch_size=3, indices=[1, 3, 5]))
    if estimator == "time":  # seeded by the run's seed
        assert not torch.equal(whole, losses(seed=4))
    else:  # common random numbers: the run's seed does not enter, only the evaluation seed
        assert torch.equal(whole, losses(seed=4))
        assert not torch.equal(whole, losses(eval_seed=1))


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
    recipe = TrainConfig(seq_len=16, batch_size=8)
    assert ARM.training_noise(recipe, step=3, shard=0, micro=8) is None
    whole = MDM.training_noise(recipe, step=3, shard=0, micro=8)
    halves = [MDM.training_noise(recipe, step=3, shard=s, micro=4) for s in (0, 1)]
    assert torch.equal(torch.cat([h.p for h in halves]), whole.p)
    assert torch.allclose(whole.p.sort().values.diff(), torch.full((7,), (1 - recipe.mdm_eps) / 8), atol=1e-6)
    assert whole.masked.shape == (8, 16)
    assert not torch.equal(MDM.training_noise(recipe, step=4, shard=0, micro=8).p, whole.p)


def test_count_masking_trains_on_exactly_l_tokens_spread_over_the_global_batch():
    """mdm_masking=count: row i masks exactly l_i tokens (weight L/l_i), the counts stratified over the global batch."""
    recipe = TrainConfig(seq_len=16, batch_size=8, mdm_masking="count")
    whole = MDM.training_noise(recipe, step=3, shard=0, micro=8)
    counts = whole.masked.sum(dim=1)
    assert torch.equal(whole.p, counts.float() / 16)
    assert sorted(counts.tolist()) == [c + counts.min().item() for c in range(0, 16, 2)]  # one count per stratum
    halves = [MDM.training_noise(recipe, step=3, shard=s, micro=4) for s in (0, 1)]
    assert torch.equal(torch.cat([h.masked.sum(dim=1) for h in halves]), counts)


# Where a family could be asked for by name or by its attention mask; model.py implements the mask itself.
BRANCH = re.compile(r"""[=!]=\s*["'](arm|mdm)["']|["'](arm|mdm)["']\s*[=!]=|\bin\s*\(["'](arm|mdm)|\.causal\b""")


def test_no_code_outside_the_family_module_branches_on_the_family():
    root = Path(__file__).resolve().parents[1]
    files = [*(root / "pipeline").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    offenders = [f"{path.name}:{n}: {line.strip()}" for path in files if path.name not in ("family.py", "model.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if BRANCH.search(line)]
    assert not offenders, offenders
