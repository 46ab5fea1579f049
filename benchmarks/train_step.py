"""Trainer step time against a bare PyTorch AdamW loop on the same model, batches and machine.

The trainer is built as `isoflop train` builds it (one rank, the recipe's ZeRO stage, isoflop's DeepSpeed
settings) and reads its loss once per log window as `train` does. A third loop is the same trainer with
DeepSpeed's own one-rank ZeRO defaults (gradients staged for a reduce-scatter), to show what those cost.
The loops take turns in one process, a log window of steps each, so a drift in the machine's speed (10%
within seconds on a shared box) hits all of them; the ratio is the median over turns of bare time / loop time.
Target: >= 0.95 for the trainer.   Usage: python benchmarks/train_step.py [--family mdm] [--turns 40]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pipeline.data.dataset import load_dataset
from pipeline.data.synthetic import synthetic
from pipeline.model.family import FAMILIES
from pipeline.model.flops import budget_for_steps
from pipeline.model.shapes import resolve_shape
from pipeline.model.transformer import Transformer
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.loop import ONE_RANK_ZERO, LogWindow, Reporter, build_run, lr_at, train_step


class BareLoop:
    """The recipe's step in plain PyTorch: same model, batches, noise, schedule and clipping."""

    def __init__(self, spec: RunSpec, data, steps: int):
        recipe = self.recipe = spec.train
        self.family, self.data, self.steps = FAMILIES[spec.family], data, steps
        torch.manual_seed(recipe.seed)
        self.model = Transformer(self.family.model_config(spec.shape, data.info.vocab_size, recipe.seq_len, recipe.init))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, betas=(recipe.beta1, recipe.beta2),
                                     weight_decay=recipe.weight_decay)

    def window(self, first: int, count: int) -> None:
        recipe, losses = self.recipe, []
        for step in range(first, first + count):
            for group in self.opt.param_groups:
                group["lr"] = lr_at(step, self.steps, recipe)
            block = self.data.train_batch(step=step, rank=0, world_size=1, batch_size=recipe.batch_size,
                                          seq_len=recipe.seq_len, seed=recipe.seed)
            loss = self.family.loss(self.model, block, self.family.training_noise(recipe, step, 0, recipe.batch_size)).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)
            self.opt.step()
            losses.append(loss.detach())
        torch.stack(losses).mean().item()  # one host read per window, as the trainer does


class Trainer:
    """isoflop's trainer, one log window at a time."""

    def __init__(self, spec: RunSpec, data_dir: str, out_dir: str):
        self.run = build_run(spec, data_dir, out_dir)

    def window(self, first: int, count: int) -> None:
        window = LogWindow(self.run)
        for step in range(first, first + count):
            loss, lr = train_step(self.run, step)
            window.add(loss)
        window.flush(Reporter(), first + count, lr, verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mdm", choices=sorted(FAMILIES))
    parser.add_argument("--model", default="cpu-591k")
    parser.add_argument("--zero-stage", type=int, default=TrainConfig().zero_stage, help="default: the recipe's")
    parser.add_argument("--window", type=int, default=5, help="steps per turn (the log window)")
    parser.add_argument("--turns", type=int, default=40, help="turns per loop, after one untimed warm-up turn")
    args = parser.parse_args()
    recipe = TrainConfig(seq_len=128, batch_size=16, lr=1e-3, warmup_min_steps=10, log_every=args.window,
                      checkpoint_every=0, eval_samples=1, val_blocks=1, zero_stage=args.zero_stage)
    steps = args.window * (args.turns + 1)
    with tempfile.TemporaryDirectory() as tmp:  # a corpus no loop repeats: 1.25x the tokens they train on
        data_dir = synthetic(f"{tmp}/data", tokens=int(1.25 * steps * recipe.batch_size * (recipe.seq_len + 1)), seed=0).path
        data = load_dataset(data_dir)
        shape = resolve_shape(args.model)
        spec = RunSpec(family=args.family, shape=shape, train=recipe,
                       budget=budget_for_steps(shape, steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len))
        staged = {"zero_optimization": {key: not value for key, value in ONE_RANK_ZERO.items()}}
        loops = {
            "bare PyTorch": BareLoop(spec, data, steps),
            "isoflop trainer": Trainer(spec, data_dir, f"{tmp}/trainer"),
            "with DeepSpeed's one-rank defaults": Trainer(
                spec.model_copy(update={"train": recipe.with_overrides({"deepspeed": staged})}), data_dir, f"{tmp}/staged"),
        }
        seconds = {name: [] for name in loops}
        for turn in range(args.turns + 1):
            order = list(loops) if turn % 2 else list(reversed(loops))  # no loop always runs right after another
            for name in order:
                start = time.perf_counter()
                loops[name].window(turn * args.window, args.window)
                if turn:
                    seconds[name].append(time.perf_counter() - start)
    tokens = args.window * recipe.batch_size * recipe.seq_len
    bare = seconds["bare PyTorch"]
    print(f"{args.family} {args.model}, ZeRO-{args.zero_stage}, one rank, {torch.get_num_threads()} threads, "
          f"{args.turns} turns of {args.window} steps:")
    for name, times in seconds.items():
        ratios = [b / t for b, t in zip(bare, times)]
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"  {name:>36}: {tokens * len(times) / sum(times):8,.0f} tok/s   "
              f"ratio to bare {statistics.median(ratios):.3f}  (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")
    ours = statistics.median(b / t for b, t in zip(bare, seconds["isoflop trainer"]))
    print(f"train_step ratio (isoflop trainer / bare): {ours:.3f}  target >= 0.95")


if __name__ == "__main__":
    main()
