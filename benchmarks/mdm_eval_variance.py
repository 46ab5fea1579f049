"""Standard error of the MDM validation bound: stratified t against iid t at equal K, on a trained tiny model.

The bound is evaluated with R different seeds for each way of drawing t; the spread of those R values is
the estimator's standard error. Stratifying t removes the variance *between* noise levels; the mask
noise *within* a draw (about E[CE^2] ln(1/eps) / L) it cannot touch, so the gain grows with the sequence
length L. Target: iid / stratified >= 2.
Usage: python benchmarks/mdm_eval_variance.py [--samples 16] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from pipeline.config import RunSpec, TrainConfig
from pipeline.data import load_dataset
from pipeline.family import FAMILIES
from pipeline.flops import budget_for_steps
from pipeline.noise import MonteCarlo
from pipeline.run_folder import RunFolder
from pipeline.shapes import resolve_shape
from pipeline.synthetic import synthetic
from pipeline.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="K, draws per sequence")
    parser.add_argument("--repeats", type=int, default=20, help="seeds per estimator")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256,
                        help="longer sequences shrink the mask noise within a draw, which stratifying t cannot remove")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic(f"{tmp}/data", tokens=1_000_000, seed=0).path
        cfg = TrainConfig(seq_len=args.seq_len, batch_size=16, lr=3e-3, warmup_min_steps=10, log_every=50, checkpoint_every=0,
                          eval_samples=4, val_blocks=4, zero_stage=0)
        shape = resolve_shape("cpu-197k")
        budget = budget_for_steps(shape, 800, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        trained = train(RunSpec(family="mdm", shape=shape, budget=budget, train=cfg), data_dir, f"{tmp}/run", verbose=False)
        model = RunFolder(f"{tmp}/run").load().model
        blocks = load_dataset(data_dir).val_blocks(seq_len=cfg.seq_len, max_blocks=args.sequences)
    print(f"trained tiny MDM: val bound {trained.val_loss:.4f} nats/token; {len(blocks)} sequences, K={args.samples}")
    spread = {}
    for name, stratified in (("stratified", True), ("iid", False)):
        values = [FAMILIES["mdm"].sequence_losses(model, blocks, MonteCarlo(args.samples, seed, stratified=stratified,
                                                                           batch_size=256)).mean().item()
                  for seed in range(args.repeats)]
        spread[name] = statistics.stdev(values)
        print(f"{name:>10}: mean {statistics.mean(values):.4f}, standard error {spread[name]:.5f} over {args.repeats} seeds")
    print(f"mdm_eval_variance ratio (iid SE / stratified SE): {spread['iid'] / spread['stratified']:.2f}  target >= 2")


if __name__ == "__main__":
    main()
