"""bf16 training throughput and MFU of the trainer on one GPU for the paper's 113M and 336M shapes.

Context 2048, micro batch 8 (accumulated to a global batch of 32), ZeRO-2 (the recipe's stage), on the built-in
corpus, with train.compile off and on. MFU counts 6 x matmul params + attention (the palm convention) against the
GPU's dense bf16 peak; the first logged window (compile, warm-up) is left out. Goal: MFU >= 45% for the 336M shape.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from pipeline.data.synthetic import synthetic
from pipeline.model.family import FAMILIES
from pipeline.model.flops import budget_for_steps
from pipeline.model.shapes import resolve_shape
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.loop import Reporter, train


class Last(Reporter):
    def __init__(self):
        self.rows = []

    def metrics(self, rows):
        self.rows.append(rows[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smdm-113M,smdm-336M")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--compile", default="off,on", help="compile settings to measure, e.g. off,on")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
    print(torch.cuda.get_device_name(), torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic(f"{tmp}/data", tokens=4_000_000, seed=0).path
        print("model family compile tokens/s MFU", flush=True)
        for name in args.models.split(","):
            for family in FAMILIES:
                for compiled in args.compile.split(","):
                    recipe = TrainConfig(seq_len=2048, batch_size=4 * args.micro_batch, micro_batch_size=args.micro_batch,
                                      lr=2e-4, warmup_min_steps=5, log_every=10, checkpoint_every=0, eval_samples=1,
                                      val_blocks=1, zero_stage=2, precision="bf16", compile=compiled == "on")
                    shape = resolve_shape(name)
                    budget = budget_for_steps(shape, args.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len)
                    spec = RunSpec(family=family, shape=shape, budget=budget, train=recipe)
                    last = Last()
                    train(spec, data_dir, f"{tmp}/{name}-{family}-{compiled}", reporter=last, verbose=False)
                    steady = last.rows[1:] or last.rows
                    rate = sum(r["tokens_per_s"] for r in steady) / len(steady)
                    mfu = sum(r.get("mfu", float("nan")) for r in steady) / len(steady)
                    print(f"{name} {family} {compiled} {rate:,.0f} {mfu:.1%}", flush=True)


if __name__ == "__main__":
    main()
