"""Standard error of the MDM validation bound: the "time" estimator against the "count" one at equal K, on a trained
tiny model.

The bound is evaluated with R different seeds for each estimator; the spread of those R values, pooled over
the independently drawn sequences, is its standard error. "time" (SMDM) draws t and masks each token with
probability p, weighting by 1/p: the number actually masked is Binomial(L, p), which the weight ignores, a
noise within each draw that stratifying t cannot remove. "count" (LLaDA, Nie et al. 2025 eq. 6;
docs/method.md §2) masks exactly l tokens and weights by L/l, the count actually masked. Both target the same
bound (up to the ε floor). Stratified against iid t is shown too.
Target: time SE / count SE >= 2.
Usage: python benchmarks/mdm_eval_variance.py [--samples 16] [--repeats 20] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from pipeline.data.dataset import load_dataset
from pipeline.data.synthetic import synthetic
from pipeline.model.family import FAMILIES
from pipeline.model.flops import budget_for_steps
from pipeline.model.noise import MonteCarlo
from pipeline.model.shapes import resolve_shape
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.loop import train
from pipeline.training.run_folder import RunFolder

# name: how each repeat's MonteCarlo is built from its seed ("count" validation is seeded by eval_seed)
ESTIMATORS = {
    "time, stratified t": lambda k, s: MonteCarlo(k, seed=s, batch_size=256),
    "time, iid t": lambda k, s: MonteCarlo(k, seed=s, stratified=False, batch_size=256),
    "count, stratified l": lambda k, s: MonteCarlo(k, estimator="count", eval_seed=s, batch_size=256),
    "count, iid l": lambda k, s: MonteCarlo(k, estimator="count", eval_seed=s, stratified=False, batch_size=256),
}


def trained_model(seq_len: int, sequences: int):
    """A tiny MDM trained on the synthetic corpus, and validation blocks to score."""
    steps, batch = 800, 16
    with tempfile.TemporaryDirectory() as tmp:
        # one epoch (the recipe's): the corpus holds every training block, with room for the held-out split
        data_dir = synthetic(f"{tmp}/data", tokens=int(1.2 * steps * batch * (seq_len + 1)), seed=0).path
        recipe = TrainConfig(seq_len=seq_len, batch_size=batch, lr=3e-3, warmup_min_steps=10, log_every=50,
                          checkpoint_every=0, eval_samples=4, val_blocks=4, zero_stage=0)
        shape = resolve_shape("cpu-197k")
        budget = budget_for_steps(shape, steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len)
        trained = train(RunSpec(family="mdm", shape=shape, budget=budget, train=recipe), data_dir, f"{tmp}/run",
                        verbose=False)
        model = RunFolder(f"{tmp}/run").load().model
        blocks = load_dataset(data_dir).val_blocks(seq_len=recipe.seq_len, max_blocks=sequences)
    return model, blocks, trained.val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="K, draws per sequence")
    parser.add_argument("--repeats", type=int, default=20, help="seeds per estimator")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="L, tokens per sequence")
    args = parser.parse_args()
    model, blocks, val_loss = trained_model(args.seq_len, args.sequences)
    print(f"trained tiny MDM: val bound {val_loss:.4f} nats/token; {len(blocks)} sequences, "
          f"L={args.seq_len}, K={args.samples}")
    spread = {}
    for name, build in ESTIMATORS.items():
        values = torch.stack([FAMILIES["mdm"].sequence_losses(model, blocks, build(args.samples, seed))
                              for seed in range(args.repeats)])  # [R, sequences]
        # sequences draw independently, so the mean's variance is the sum of theirs: pooling them gives
        # sequences·(R − 1) degrees of freedom instead of the R − 1 of the R means' spread
        spread[name] = values.var(dim=0).sum().sqrt().item() / values.shape[1]
        print(f"{name:>20}: mean {values.mean().item():.4f}, standard error {spread[name]:.5f} "
              f"(spread of the {args.repeats} seeds' means {values.mean(dim=1).std().item():.5f})")
    print(f"stratified t: iid SE / stratified SE {spread['time, iid t'] / spread['time, stratified t']:.2f}")
    ratio = spread["time, stratified t"] / spread["count, stratified l"]
    print(f"mdm_eval_variance ratio (time SE / count SE): {ratio:.2f}  target >= 2")


if __name__ == "__main__":
    main()
