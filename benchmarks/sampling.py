"""Sampling speed against quality: MDM samplers over a range of steps against KV-cached ARM decoding.

One MDM and one ARM of the same shape (trained here on the synthetic corpus, or given with --checkpoint)
each generate `batch` sequences of `length` tokens after an EOS. Speed: tokens/s and network calls.
Quality: generative perplexity under the ARM (a weak judge that favours its own samples) and the unigram
entropy of the samples, which falls when sampling is effectively too cold; a "data" row gives both for
held-out text of the same size. The crossover is the number of MDM steps that takes as long as the cached ARM.
Usage: python benchmarks/sampling.py [--checkpoint MDM_DIR ARM_DIR] [--out results/sampling]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.data.dataset import load_dataset
from pipeline.data.synthetic import synthetic
from pipeline.model.family import FAMILIES
from pipeline.model.flops import budget_for_steps
from pipeline.model.sampling import ArmSampling, MdmSampling, Sample, arm_sample, mdm_sample
from pipeline.model.shapes import resolve_shape
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.run_folder import RunFolder, TrainedModel


@dataclass
class Row:
    method: str
    steps: int | None
    network_calls: float
    seconds: float          # fastest repeat: the machine is shared, the minimum is the least disturbed
    tokens_per_s: float
    gen_ppl: float          # under the ARM
    unigram_entropy: float  # nats, plug-in estimate over all repeats' tokens


def train_pair(args) -> dict[str, Path]:
    """Train the MDM and the ARM with one recipe; a folder that already holds the same run is reused."""
    from pipeline.training.loop import train

    data = Path(args.out) / "data"
    if not (data / "meta.json").exists():
        tokens = args.train_steps * max(args.mdm_compute, 1) * args.train_batch * (args.seq_len + 1)
        synthetic(data, tokens=int(tokens) + 100_000, seed=0)
    recipe = TrainConfig(seq_len=args.seq_len, batch_size=args.train_batch, lr=2e-3, warmup_min_steps=20, zero_stage=0,
                      eval_samples=16, val_blocks=32, checkpoint_every=0, log_every=100)
    shape = resolve_shape(args.shape)
    budget = budget_for_steps(shape, args.train_steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len)
    folders = {}
    for family in FAMILIES.values():
        compute = {"mdm": args.mdm_compute}.get(family.name, 1)  # the paper's claim trains the MDM longer
        spec = RunSpec(family=family.name, shape=shape, budget=budget * compute, train=recipe,
                       data_fingerprint=load_dataset(data).info.fingerprint)
        folder = RunFolder(Path(args.out) / "models" / family.name)
        if not folder.is_finished(spec.run_hash):
            result = train(spec, data, folder.path, verbose=False)
            print(f"trained {family.name}: val {family.bound} {result.val_loss:.3f} nats/token in {result.seconds:.0f}s")
        folders[family.name] = folder.path
    return folders


def load_pair(paths: list[str] | None, args) -> tuple[TrainedModel, TrainedModel]:
    loaded = [RunFolder(p).load() for p in (paths or train_pair(args).values())]
    by_family = {c.family.name: c for c in loaded}
    if set(by_family) != set(FAMILIES):
        raise SystemExit("--checkpoint: give one MDM and one ARM folder")
    mdm, arm = by_family["mdm"], by_family["arm"]
    if mdm.description["spec"]["shape"] != arm.description["spec"]["shape"]:
        raise SystemExit("--checkpoint: the MDM and the ARM must have the same shape")
    return mdm, arm


def gen_ppl(arm: TrainedModel, tokens: torch.Tensor, prompt_len: int) -> float:
    """exp(mean NLL) of the generated tokens under the ARM, each given everything before it."""
    with torch.inference_mode():
        logp = F.log_softmax(arm.model(tokens[:, :-1]).double(), dim=-1).gather(-1, tokens[:, 1:, None])
    return math.exp(-logp[:, prompt_len - 1:].mean().item())


def unigram_entropy(tokens: torch.Tensor) -> float:
    p = torch.bincount(tokens.flatten()).double()
    p = p[p > 0] / p.sum()
    return -(p * p.log()).sum().item()


@dataclass
class Config:
    method: str
    steps: int | None
    draw: Callable[[int], Sample]  # seed -> a batch of samples


def measure(configs: list[Config], arm: TrainedModel, args) -> list[Row]:
    """Each repeat runs every configuration once, so a burst of load on the shared machine hits all alike."""
    for config in configs:
        config.draw(0)  # warm-up: first calls pay for allocation
    samples: list[list[Sample]] = [[] for _ in configs]
    times: list[list[float]] = [[] for _ in configs]
    for seed in range(args.repeats):
        for config, made, took in zip(configs, samples, times):
            started = time.perf_counter()
            made.append(config.draw(seed))
            if made[-1].tokens.is_cuda:
                torch.cuda.synchronize()  # CUDA runs ahead of Python: wait for it before reading the clock
            took.append(time.perf_counter() - started)
    rows = []
    for config, made, took in zip(configs, samples, times):
        tokens, prompt_len = torch.cat([s.tokens for s in made]), made[0].prompt_len
        rows.append(Row(config.method, config.steps, sum(s.network_calls for s in made) / len(made), min(took),
                        args.batch * args.length / min(took), gen_ppl(arm, tokens, prompt_len),
                        unigram_entropy(tokens[:, prompt_len:])))
    return rows


def data_row(arm: TrainedModel, args) -> Row:
    """Held-out text, as many sequences as the samplers made: what the quality columns should approach."""
    blocks = load_dataset(arm.data).val_blocks(seq_len=args.length, max_blocks=args.batch * args.repeats)
    tokens = blocks.to(arm.device)  # the first token stands in for the prompt: the rest are scored given it
    return Row("data (held out)", None, math.nan, math.nan, math.nan, gen_ppl(arm, tokens, 1),
               unigram_entropy(tokens[:, 1:]))


def crossover(rows: list[Row], arm_seconds: float) -> str:
    """MDM steps at which the reverse sampler takes as long as the KV-cached ARM: interpolated in log-log
    between the two measured step counts around it (extrapolated from the nearest two when outside)."""
    points = [(math.log(r.steps), math.log(r.seconds)) for r in rows if r.method == "mdm reverse"]
    target = math.log(arm_seconds)
    below = [i for i, (_, t) in enumerate(points) if t <= target]
    i = min(below[-1] if below else 0, len(points) - 2)
    (s0, t0), (s1, t1) = points[i], points[i + 1]
    steps = math.exp(s0 + (target - t0) * (s1 - s0) / (t1 - t0))
    measured = points[0][1] <= target <= points[-1][1]
    return (f"crossover: the MDM (reverse sampler) is as fast as the KV-cached ARM ({1e3 * arm_seconds:.0f} ms a batch) "
            f"at about {steps:.0f} steps" + ("" if measured else " (extrapolated)"))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    columns = (("tokens_per_s", "tokens / s"), ("gen_ppl", "generative perplexity (ARM)"),
               ("unigram_entropy", "unigram entropy (nats)"))
    for ax, (column, label) in zip(axes, columns):
        for method, marker in (("mdm reverse", "o"), ("mdm confidence", "s")):
            points = [(r.steps, getattr(r, column)) for r in rows if r.method == method]
            ax.plot(*zip(*points), marker=marker, label=method)
        for method, style in (("arm kv-cache", "-"), ("arm no-cache", ":"), ("data (held out)", "--")):
            value = next(getattr(r, column) for r in rows if r.method == method)
            if math.isfinite(value):
                ax.axhline(value, color="k", linestyle=style, linewidth=1, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MDM sampling steps")
        ax.set_ylabel(label)
        if column == "tokens_per_s":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle("MDM sampling steps against KV-cached ARM decoding: speed and quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[Row]) -> None:
    print(f"{'method':<17}{'steps':>6}{'net calls':>10}{'seconds':>9}{'tokens/s':>10}{'gen PPL':>9}{'unigram H':>10}")
    for r in rows:
        print(f"{r.method:<17}{r.steps or '':>6}{r.network_calls:>10.1f}{r.seconds:>9.3f}{r.tokens_per_s:>10.0f}"
              f"{r.gen_ppl:>9.2f}{r.unigram_entropy:>10.3f}".replace("nan", "  -"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs=2, metavar=("DIR", "DIR"), help="an MDM and an ARM folder (else train both)")
    parser.add_argument("--out", default="results/sampling")
    parser.add_argument("--shape", default="cpu-263k", help="shape to train (without --checkpoint)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--mdm-compute", type=float, default=1.0,
                        help="train the MDM on this many times the ARM's compute (the paper's speed claim: 16)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample (default: the context after EOS)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", default="8,16,32,64,128,512",
                        help="MDM steps; beyond --length most steps reveal nothing and skip the network")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    mdm, arm = load_pair(args.checkpoint, args)
    args.length = args.length or mdm.model.config.seq_len - 1
    device = mdm.device
    prompt = torch.full((args.batch, 1), load_dataset(mdm.data).info.eos_id, device=device)

    def arm_draw(cache: bool):
        return lambda seed: arm_sample(arm.model, prompt, ArmSampling(args.length, args.temperature, seed, cache))

    def mdm_draw(sampler: str, steps: int):
        return lambda seed: mdm_sample(mdm.model, prompt, MdmSampling(args.length, steps, sampler, args.temperature,
                                                                      seed=seed))

    configs = [Config("arm kv-cache", None, arm_draw(True)), Config("arm no-cache", None, arm_draw(False))]
    for sampler in ("reverse", "confidence"):
        for steps in map(int, args.steps.split(",")):
            if sampler == "reverse" or steps <= args.length:  # the confidence sampler reveals >= 1 token per step
                configs.append(Config(f"mdm {sampler}", steps, mdm_draw(sampler, steps)))
    rows = measure(configs, arm, args)
    rows.append(data_row(arm, args))

    trained = {c.family.name: c.description["result"] for c in (mdm, arm)}
    print(f"shape {mdm.description['spec']['shape']}, context {mdm.model.config.seq_len}; MDM val bound "
          f"{trained['mdm']['val_loss']:.3f}, ARM val loss {trained['arm']['val_loss']:.3f} nats/token "
          f"(MDM trained on {trained['mdm']['flops'] / trained['arm']['flops']:.3g}x the ARM's FLOPs)")
    print(f"batch {args.batch} x {args.length} tokens after EOS, temperature {args.temperature}, "
          f"{args.threads} thread(s) on {device}, best of {args.repeats}")
    print_table(rows)
    print(crossover(rows, rows[0].seconds))
    plot(rows, Path(args.out) / "sampling.png")
    (Path(args.out) / "sampling.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"wrote {Path(args.out) / 'sampling.png'} and sampling.json")


if __name__ == "__main__":
    main()
