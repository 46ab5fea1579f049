"""Trainer throughput against a bare PyTorch AdamW loop on the same model, batches and machine.

Both loops draw the same batches from the same dataset and run the same objective; the ratio is
trainer tokens/s over bare tokens/s in steady state (the first `warmup` steps of each are not timed).
Target: >= 0.95.   Usage: python benchmarks/train_step.py [--family mdm] [--model cpu-591k] [--steps 120]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from pipeline.config import RunSpec, TrainConfig
from pipeline.data import load_dataset
from pipeline.family import FAMILIES
from pipeline.flops import budget_for_steps
from pipeline.model import Transformer
from pipeline.shapes import resolve_shape
from pipeline.synthetic import synthetic
from pipeline.train import Reporter, lr_at, train


class Timer(Reporter):
    """Tokens/s over the logged windows after the warm-up window."""

    def __init__(self):
        self.windows = []

    def metrics(self, rows):
        self.windows.append(rows[-1]["tokens_per_s"])


def bare_loop(spec: RunSpec, data, steps: int, warmup: int) -> float:
    cfg, family = spec.train, FAMILIES[spec.family]
    torch.manual_seed(cfg.seed)
    model = Transformer(family.model_config(spec.shape, data.info.vocab_size, cfg.seq_len, cfg.init))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        block = data.train_batch(step=step, rank=0, world_size=1, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
        loss = family.loss(model, block, family.training_noise(cfg, step, 0, cfg.batch_size)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0:
            loss.item()  # the trainer reads the loss once per log window too
    return (steps - warmup) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mdm", choices=sorted(FAMILIES))
    parser.add_argument("--model", default="cpu-591k")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--zero-stage", type=int, default=TrainConfig().zero_stage, help="default: the recipe's")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warmup = 20
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic(f"{tmp}/data", tokens=1_000_000, seed=0).path
        data = load_dataset(data_dir)
        cfg = TrainConfig(seq_len=128, batch_size=16, lr=1e-3, warmup_min_steps=10, log_every=warmup,
                          checkpoint_every=0, eval_samples=1, val_blocks=1, zero_stage=args.zero_stage)
        shape = resolve_shape(args.model)
        budget = budget_for_steps(shape, args.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        spec = RunSpec(family=args.family, shape=shape, budget=budget, train=cfg)
        ratios = []
        for repeat in range(args.repeats):  # alternate, so drift in machine speed hits both sides
            bare = bare_loop(spec, data, args.steps, warmup)
            timer = Timer()
            train(spec, data_dir, f"{tmp}/run{repeat}", reporter=timer, verbose=False)
            ours = sum(timer.windows[1:]) / len(timer.windows[1:])
            ratios.append(ours / bare)
            print(f"repeat {repeat}: trainer {ours:,.0f} tok/s, bare loop {bare:,.0f} tok/s, ratio {ours / bare:.3f}")
    print(f"train_step ratio (trainer / bare, {args.family} {args.model}, ZeRO-{args.zero_stage}, "
          f"{torch.get_num_threads()} threads): {sum(ratios) / len(ratios):.3f}  target >= 0.95")


if __name__ == "__main__":
    main()
