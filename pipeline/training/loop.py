"""The DeepSpeed training loop every grid point runs, on CPU ranks (gloo) or GPUs (NCCL).

It expects a process group (Ray Train's, or `distributed.spawn`'s, or a one-rank group it makes)
and reports through a `Reporter`, so it knows nothing of Ray Tune or sweep files. A batch, a mask
draw and a learning rate are pure functions of (seed, step), so a resumed run continues exactly.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.data.dataset import TokenDataset, load_dataset
from pipeline.errors import ConfigError, DataError
from pipeline.model.family import FAMILIES, Family, mc_stderr, mean_and_stderr
from pipeline.model.flops import BudgetPlan
from pipeline.model.noise import MonteCarlo
from pipeline.model.transformer import Transformer
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training import deepspeed_settings, distributed, kept_checkpoints
from pipeline.training.run_folder import RunFolder

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run stops and is reported failed, not retried."""


@dataclass
class TrainResult:
    run_hash: str
    family: str
    model: str
    params: int            # non-embedding N
    params_total: int
    budget: float
    tokens: int
    flops: float
    flops_convention: str
    steps: int
    val_loss: float
    val_stderr: float      # the spread between validation sequences: shared by every run of a sweep
    val_mc_stderr: float   # the Monte Carlo error given those sequences, the one left in comparisons (ARM: 0)
    world_size: int
    seconds: float
    tokens_per_s: float
    resumed_from_step: int
    flops_spent: float | None = None  # every matmul and attention (flops.spent_flops_per_token); None: older runs


class Reporter:
    """Hooks the trainer calls; the default ignores them. Subclasses log to MLflow or Ray."""

    def metrics(self, rows: list[dict]) -> None:
        """Rank 0, every log_every steps: one dict for the window (step: its last, loss: its mean, lr: its last,
        tokens, flops, tokens_per_s, and mfu on GPUs), so a tracker's store grows with steps / log_every."""

    def progress(self, row: dict, steps: int) -> None:
        """Every rank, after each log window: the window's row (rank 0's is the one `metrics` got) and the run's
        total steps, for a live display of the run; every rank, since Ray Train's report is collective."""

    def checkpoint(self, step: int, directory: Path, metrics: dict) -> None:
        """Every rank, after a checkpoint is saved and all ranks have finished writing it."""


def lr_at(step: int, steps: int, recipe: TrainConfig) -> float:
    """Linear warmup, then down to lr * min_lr_ratio at the last step: by a cosine over the rest of the run, or
    (wsd) held at lr and decayed over the last decay_steps, linearly or as 1 - sqrt."""
    warmup = recipe.warmup_steps(steps)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    floor = recipe.lr * recipe.min_lr_ratio
    start = recipe.decay_start(steps)
    progress = min(1.0, max(0.0, (step - start) / max(1, steps - start - 1)))
    if recipe.schedule == "cosine":
        return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < start:
        return recipe.lr
    left = 1 - progress if recipe.decay_shape == "linear" else 1 - math.sqrt(progress)
    return floor + (recipe.lr - floor) * left


def batch_layout(recipe: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) for the global batch."""
    micro = recipe.micro_batch_size or recipe.batch_size // world_size
    if micro == 0 or recipe.batch_size % (micro * world_size):
        raise ConfigError(f"train.batch_size: {recipe.batch_size} is not a multiple of micro_batch_size ({micro}) x "
                         f"world size ({world_size})")
    return micro, recipe.batch_size // (micro * world_size)


def check_run(spec: RunSpec, data_dir: str | Path, world_size: int = 1) -> tuple[TokenDataset, BudgetPlan]:
    """Everything that can be wrong before compute is spent; returns (dataset, plan)."""
    data = load_dataset(data_dir)
    if spec.data_fingerprint and spec.data_fingerprint != data.info.fingerprint:
        raise DataError(f"data: {data_dir} has fingerprint {data.info.fingerprint}, the run expects {spec.data_fingerprint}")
    recipe = spec.train
    batch_layout(recipe, world_size)
    data.val_blocks(seq_len=recipe.seq_len, max_blocks=1)  # raises if the val split is too short
    if data.num_train_blocks(recipe.seq_len) < 1:
        raise DataError(f"data: {data_dir} has no training block of seq_len+1={recipe.seq_len + 1} tokens")
    return data, spec.plan(data.info.vocab_size, data.num_train_blocks(recipe.seq_len))


# With one rank there is nothing to reduce, yet ZeRO-1/2 by default still copies each gradient into a bucket as
# autograd makes it and splits the bucket rank by rank: 2-4% of a small CPU step, and no bit of the
# result changes without it (tests/test_deepspeed_settings.py). A sweep's `deepspeed:` block can set both back.
ONE_RANK_ZERO = {"contiguous_gradients": False, "reduce_scatter": False}


def deepspeed_config(recipe: TrainConfig, micro: int, accumulation: int, bf16: bool, world: int) -> dict:
    return deepspeed_settings.merged({
        "train_batch_size": recipe.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": recipe.grad_clip,
        "zero_optimization": {"stage": recipe.zero_stage, **(ONE_RANK_ZERO if world == 1 else {})},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,
    }, recipe.deepspeed)


@dataclass
class Run:
    """One rank's view of a run being trained: what it is, where its data and weights are."""
    spec: RunSpec
    family: Family
    data: TokenDataset
    plan: BudgetPlan
    rank: int
    world: int
    micro: int                  # sequences per micro batch on this rank
    accumulation: int           # micro batches per step
    device: torch.device
    engine: object              # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    folder: RunFolder           # the final weights and description
    params_total: int

    @property
    def checkpoints(self) -> Path:
        return self.folder.checkpoints


def build_run(spec: RunSpec, data_dir: str | Path, out_dir: str | Path) -> Run:
    """Process group, checks, model, optimizer and DeepSpeed engine; identical weights on every rank and attempt."""
    distributed.configure_accelerator()
    import deepspeed  # after the accelerator is chosen

    rank, world = distributed.ensure_process_group()
    recipe, family = spec.train, FAMILIES[spec.family]
    data, plan = check_run(spec, data_dir, world)
    micro, accumulation = batch_layout(recipe, world)
    device = distributed.device_for_rank()
    bf16 = recipe.bf16_on(device.type)
    torch.manual_seed(recipe.seed)
    model = Transformer(family.model_config(spec.shape, data.info.vocab_size, recipe.seq_len, recipe.init))
    params_total = model.total_params()  # before ZeRO-3 partitions the parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(recipe.beta1, recipe.beta2),
                                  weight_decay=recipe.weight_decay, fused=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(recipe, micro, accumulation, bf16, world))
    if recipe.compile:
        engine.compile()  # in place: parameter names, checkpoints and the final weights stay those of the model
    return Run(spec, family, data, plan, rank, world, micro, accumulation, device, engine, optimizer,
               RunFolder(out_dir), params_total)


def resume(run: Run, resume_from: str | Path | None) -> int:
    """Load `resume_from` (a DeepSpeed checkpoint folder, whose latest tag is taken, or one tag's folder in it),
    else the run's own latest checkpoint; the next step."""
    if resume_from:
        source = Path(resume_from)
    elif kept_checkpoints.has_checkpoint(run.checkpoints):
        source = run.checkpoints
    else:
        return 0
    if kept_checkpoints.has_checkpoint(source):
        _, client = run.engine.load_checkpoint(str(source))
    else:  # a tag's folder: a ladder's branch starts from its stable run's checkpoint at the branch step
        _, client = run.engine.load_checkpoint(str(source.parent), tag=source.name)
    if client is None:
        raise ConfigError(f"resume: {source} holds no DeepSpeed checkpoint")
    return int(client["step"])


def train_step(run: Run, step: int) -> tuple[torch.Tensor, float]:
    """One optimizer step over the global batch `step`; (this rank's mean loss as a tensor, lr). The loss stays
    on the device: reading it (a host sync that stalls a GPU's queue) waits for the log window."""
    recipe = run.spec.train
    lr = lr_at(step, run.plan.steps, recipe)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    for m in range(run.accumulation):
        shard = run.rank * run.accumulation + m  # a virtual rank: the global batch is the same however it is split
        block = run.data.train_batch(step=step, rank=shard, world_size=run.world * run.accumulation,
                                     batch_size=run.micro, seq_len=recipe.seq_len, seed=recipe.seed,
                                     unique_tokens=recipe.unique_tokens).to(run.device)
        noise = run.family.training_noise(recipe, step, shard, run.micro)
        if noise is not None:
            noise = noise.to(run.device)
        loss = run.family.loss(run.engine, block, noise).mean()
        run.engine.backward(loss)
        run.engine.step()
        step_loss += loss.detach().double() / run.accumulation
    return step_loss, lr


@dataclass
class LogWindow:
    """The steps since the last log: their loss averaged over steps and ranks, timed, checked for divergence,
    then reported as one row."""
    run: Run
    losses: list[torch.Tensor] = field(default_factory=list)
    clock: float = field(default_factory=time.perf_counter)
    end: int | None = None  # the step the run stops at, when before its last (a stable run's end)

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def flush(self, reporter: Reporter, step: int, lr: float, verbose: bool) -> None:
        """`step` and `lr`: the window's last step (counted from 1) and its learning rate."""
        run, plan = self.run, self.run.plan
        loss = _mean_over_ranks(torch.stack(self.losses).mean().item(), run.world)  # the window's one host sync
        rate = len(self.losses) * plan.tokens_per_step / (time.perf_counter() - self.clock)
        if not math.isfinite(loss):
            raise Diverged(f"loss became {loss} by step {step}")
        row = {"step": step, "loss": loss, "lr": lr, "tokens": step * plan.tokens_per_step,
               "flops": step * plan.tokens_per_step * plan.flops_per_token, "tokens_per_s": rate}
        peak = _peak_flops(run.device) * run.world if run.device.type == "cuda" else None
        if peak:
            row["mfu"] = rate * run.plan.spent_per_token / peak
        if run.rank == 0:
            reporter.metrics([row])
            if verbose:
                _print_progress(row, self.end or plan.steps, rate, plan.tokens_per_step)
        reporter.progress(row, plan.steps)
        self.losses, self.clock = [], time.perf_counter()


def save_checkpoint(run: Run, step: int, keep: bool = False) -> None:
    """Every rank writes its shard; older tags go once the new one is complete, except kept ones
    (pipeline/training/kept_checkpoints.py). `keep` marks this one kept. A kept checkpoint already there is not
    written again: it holds this same state (a step's state is a function of the recipe), and a branch may be
    reading it."""
    tag = kept_checkpoints.tag(step)
    if kept_checkpoints.is_kept(run.checkpoints / tag):
        return
    run.engine.save_checkpoint(str(run.checkpoints), tag=tag, client_state={"step": step})
    dist.barrier()
    if run.rank == 0:
        if keep:
            kept_checkpoints.mark(run.checkpoints, step)
        for old in run.checkpoints.glob("step*"):
            if old.name != tag and old.is_dir() and not kept_checkpoints.is_kept(old):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def finish(run: Run, start: int, seconds: float) -> TrainResult:
    """Validate, write the run folder (rank 0) and drop the optimizer state, now dead weight (unless
    train.keep_checkpoint asks to keep the last checkpoint, from which the run can be continued)."""
    spec, plan, recipe = run.spec, run.plan, run.spec.train
    val = run.data.val_blocks(seq_len=recipe.seq_len, max_blocks=recipe.val_blocks).to(run.device)
    val_loss, val_stderr, val_mc_stderr = _evaluate(run, val)
    result = TrainResult(
        run_hash=spec.run_hash, family=spec.family, model=spec.shape.label, params=spec.shape.non_embedding_params(),
        params_total=run.params_total, budget=spec.budget, tokens=plan.tokens, flops=plan.flops,
        flops_convention=recipe.flops_convention, steps=plan.steps, val_loss=val_loss, val_stderr=val_stderr,
        val_mc_stderr=val_mc_stderr, world_size=run.world, seconds=seconds,
        tokens_per_s=(plan.steps - start) * plan.tokens_per_step / seconds, resumed_from_step=start,
        flops_spent=plan.flops_spent)
    state = master_weights(run.engine)
    if run.rank == 0:
        run.folder.write(state, spec, run.data.info, result)
        if not recipe.keep_checkpoint:
            shutil.rmtree(run.checkpoints, ignore_errors=True)
    dist.barrier()
    return result


def master_weights(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights on the CPU, whatever the precision and ZeRO stage, by DeepSpeed's public
    `safe_get_full_fp32_param`, which gathers a ZeRO-1/2/3 partition from every rank (call it on all ranks).
    It answers None where no optimizer keeps a separate fp32 copy (ZeRO-0 in fp32): the weights are that copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (param.detach() if full is None else full).float().cpu()
    return state


def train(spec: RunSpec, data_dir: str | Path, out_dir: str | Path, *, reporter: Reporter | None = None,
          resume_from: str | Path | None = None, stop_at: int | None = None, keep_at: frozenset[int] = frozenset(),
          verbose: bool = True) -> TrainResult | None:
    """Train one run to its budget and evaluate it; returns the result on every rank.

    Resumes from `resume_from` (a DeepSpeed checkpoint folder, or one tag's folder in it) or else from
    out_dir/checkpoints when one is there. `stop_at` ends early after checkpointing that step (returns None): an
    interruption on purpose, for tests, time-limited jobs and a ladder's stable run. A checkpoint is saved and
    kept at each step of `keep_at` (a stable run's branch steps).
    """
    reporter = reporter or Reporter()
    run = build_run(spec, data_dir, out_dir)
    recipe, steps = spec.train, run.plan.steps
    start, started = resume(run, resume_from), time.perf_counter()
    if verbose and run.rank == 0:
        _announce(run, start)
    end = steps if stop_at is None else min(stop_at, steps)
    window = LogWindow(run, end=end)
    for step in range(start, end):
        loss, lr = train_step(run, step)
        window.add(loss)
        done = step + 1
        if done % recipe.log_every == 0 or done == end:
            window.flush(reporter, done, lr, verbose)
        last = done == end and (done < steps or recipe.keep_checkpoint)  # an interruption, or a checkpoint to keep
        keep = done in keep_at
        if (recipe.checkpoint_every and done % recipe.checkpoint_every == 0) or last or keep:
            save_checkpoint(run, done, keep)
            reporter.checkpoint(done, run.checkpoints, {"step": done})
    if end < steps:
        return None
    return finish(run, start, time.perf_counter() - started)


def _evaluate(run: Run, val: torch.Tensor) -> tuple[float, float, float]:
    """(val_loss, val_stderr, val_mc_stderr). Each rank scores every world-th sequence; ranks do equal work
    (ZeRO-3 gathers weights in lockstep)."""
    recipe, n, rank, world = run.spec.train, len(val), run.rank, run.world
    per_rank = math.ceil(n / world)
    mine = [i % n for i in range(rank, per_rank * world, world)]
    mc = MonteCarlo(samples=recipe.eval_samples, seed=recipe.seed, eps=recipe.mdm_eps, stratified=recipe.t_sampling == "stratified",
                    batch_size=recipe.eval_batch_size, estimator=recipe.mdm_eval)
    values, variances = run.family.sequence_losses_and_mc_var(run.engine, val, mc, mine)
    gathered = torch.zeros(2, n, dtype=torch.float64)  # losses and their Monte Carlo variances, one all_reduce
    keep = [k for k, i in enumerate(range(rank, per_rank * world, world)) if i < n]
    gathered[:, [mine[k] for k in keep]] = torch.stack([values, variances])[:, keep]
    if world > 1:
        dist.all_reduce(gathered)
    return (*mean_and_stderr(gathered[0]), mc_stderr(gathered[1]))


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / world


def _announce(run: Run, start: int) -> None:
    spec, plan, recipe = run.spec, run.plan, run.spec.train
    print(f"[{spec.run_name}] {spec.family} N={spec.shape.non_embedding_params():,} D={plan.tokens:,} tokens "
          f"C={plan.flops:.3g} steps={plan.steps} epochs={plan.epochs:.3g} world={run.world} zero={recipe.zero_stage}"
          + (f" resuming at step {start}" if start else ""), flush=True)


def _peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def _print_progress(row: dict, end: int, rate: float, tokens_per_step: int) -> None:
    remaining = (end - row["step"]) * tokens_per_step / rate
    mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
    print(f"  step {row['step']}/{end} | tokens {row['tokens']:.3g} | loss {row['loss']:.4f} | "
          f"lr {row['lr']:.2e} | {rate:,.0f} tok/s{mfu} | ETA {remaining:,.0f}s", flush=True)
