"""bf16 training throughput, MFU and peak memory of the trainer on one GPU for the paper's 113M and 336M shapes.

Context 2048, micro batch 8 (accumulated to a global batch of 32), ZeRO-2 (the recipe's stage), on the built-in
corpus, with train.compile off and on. MFU counts 6 x matmul params + attention (the palm convention) against the
GPU's dense bf16 peak; the first logged window (compile, warm-up) is left out. Goal: MFU >= 45% for the 336M shape.
Every import is checked before any GPU time is spent; each row is appended to --table as it finishes, so a run
stopped by its time limit keeps what it measured. `--device cpu` rehearses the same path on a CPU (no MFU).
Usually started by benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import importlib
import resource
import sys
import tempfile
from pathlib import Path

# Everything the measurement imports, the trainer's lazy DeepSpeed imports included.
NEEDED = ["torch", "numpy", "yaml", "safetensors", "pydantic", "hjson", "deepspeed",
          "deepspeed.runtime.zero.stage_1_and_2", "pipeline.data.synthetic", "pipeline.model.flops",
          "pipeline.model.shapes", "pipeline.recipe", "pipeline.training.loop"]


def missing_modules() -> list[str]:
    """Each module that cannot be found, once, with the first needed module that imports it."""
    missing: dict[str, str] = {}
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            missing.setdefault(err.name, err.name if err.name == name else f"{err.name} (needed by {name})")
    return list(missing.values())


def measure(args: argparse.Namespace, table: Path) -> None:
    import torch

    from pipeline.data.synthetic import synthetic
    from pipeline.model.family import FAMILIES

    cuda = args.device == "cuda"
    print(torch.cuda.get_device_name() if cuda else "CPU rehearsal", f"torch {torch.__version__}", flush=True)
    header = "| model | family | compile | tokens/s | MFU | peak memory (GiB) |\n|---|---|---|---|---|---|\n"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(header)
    print(header, end="", flush=True)
    batch = 4 * args.micro_batch
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic(f"{tmp}/data", tokens=2 * args.steps * batch * args.seq_len + 100_000, seed=0).path
        for name in args.models.split(","):
            for family in FAMILIES:
                for compiled in args.compile.split(","):
                    try:
                        cells = one_run(args, name, family, compiled == "on", data_dir,
                                        f"{tmp}/{name}-{family}-{compiled}")
                    except Exception as err:  # one failed setting must not cost the others their GPU time
                        cells = [f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}", "", ""]
                    row = f"| {name} | {family} | {compiled} | {' | '.join(cells)} |\n"
                    with table.open("a") as out:
                        out.write(row)
                    print(row, end="", flush=True)
                    if cuda:
                        torch.cuda.empty_cache()


def one_run(args: argparse.Namespace, name: str, family: str, compiled: bool, data_dir, out_dir: str) -> list[str]:
    """tokens/s, MFU and peak memory of one short training run, as table cells."""
    import torch

    from pipeline.model.flops import budget_for_steps
    from pipeline.model.shapes import resolve_shape
    from pipeline.recipe import RunSpec, TrainConfig
    from pipeline.training.loop import Reporter, train

    class LastRows(Reporter):
        def __init__(self):
            self.rows = []

        def metrics(self, rows):
            self.rows.append(rows[-1])

    recipe = TrainConfig(seq_len=args.seq_len, batch_size=4 * args.micro_batch, micro_batch_size=args.micro_batch,
                         lr=2e-4, warmup_min_steps=min(5, args.steps - 1), min_steps=1, log_every=args.log_every,
                         checkpoint_every=0, eval_samples=1, val_blocks=1, zero_stage=2, precision="bf16",
                         compile=compiled)
    shape = resolve_shape(name)
    budget = budget_for_steps(shape, args.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    last = LastRows()
    train(RunSpec(family=family, shape=shape, budget=budget, train=recipe), data_dir, out_dir, reporter=last,
          verbose=False)
    steady = last.rows[1:] or last.rows
    rate = sum(r["tokens_per_s"] for r in steady) / len(steady)
    mfu = sum(r["mfu"] for r in steady) / len(steady) if "mfu" in steady[0] else None
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's resident peak so far: an upper bound for this run
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return [f"{rate:,.0f}", "n/a" if mfu is None else f"{mfu:.1%}", f"{peak:.2f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smdm-113M,smdm-336M", help="shape names, comma-separated")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged window")
    parser.add_argument("--compile", default="off,on", help="compile settings to measure, e.g. off,on")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--table", default="results/gpu_check.md", help="markdown table of the results")
    args = parser.parse_args()
    missing = missing_modules()
    if missing:
        print(f"gpu_check: missing Python modules: {', '.join(missing)}; the offline bundle (make gpu-bundle) "
              f"or the image should provide them", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (use --device cpu to rehearse on a CPU)", file=sys.stderr)
        return 2
    measure(args, Path(args.table))
    print(f"table: {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
