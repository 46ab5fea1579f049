"""The DeepSpeed training loop every grid point runs, on CPU ranks (gloo) or GPUs (NCCL).

It expects a process group (Ray Train's, or `distributed.spawn`'s, or a one-rank group it makes)
and reports through a `Reporter`, so it knows nothing of Ray Tune or sweep files. A batch, a mask
draw and a learning rate are pure functions of (seed, step), so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import distributed
from pipeline.config import RunSpec, TrainConfig
from pipeline.data import DataError, load_dataset
from pipeline.flops import BudgetPlan, flops_per_token, plan_budget
from pipeline.model import ModelConfig, Transformer
from pipeline.objectives import FAMILIES, diffusion_times, generator, mean_and_stderr, sequence_losses

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
    val_stderr: float
    world_size: int
    seconds: float
    tokens_per_s: float
    resumed_from_step: int


class Reporter:
    """Hooks the trainer calls; the default prints progress. Subclasses log to MLflow or Ray."""

    def metrics(self, rows: list[dict]) -> None:
        """Rank 0, every log_every steps: one dict per step (step, loss, lr, tokens, flops, tokens_per_s, mfu)."""

    def checkpoint(self, step: int, directory: Path, metrics: dict) -> None:
        """Every rank, after a checkpoint is saved and all ranks have finished writing it."""


def lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    warmup = cfg.warmup_steps(steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) for the global batch."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    if micro == 0 or cfg.batch_size % (micro * world_size):
        raise ValueError(f"train.batch_size: {cfg.batch_size} is not a multiple of micro_batch_size ({micro}) x "
                         f"world size ({world_size})")
    return micro, cfg.batch_size // (micro * world_size)


def plan_run(spec: RunSpec, vocab_size: int) -> BudgetPlan:
    cfg = spec.train
    return plan_budget(spec.budget, spec.shape, vocab_size=vocab_size, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                       convention=cfg.flops_convention, min_steps=cfg.min_steps)


def check_run(spec: RunSpec, data_dir: str | Path, world_size: int = 1):
    """Everything that can be wrong before compute is spent; returns (dataset, plan)."""
    data = load_dataset(data_dir)
    if spec.data_fingerprint and spec.data_fingerprint != data.info.fingerprint:
        raise DataError(f"data: {data_dir} has fingerprint {data.info.fingerprint}, the run expects {spec.data_fingerprint}")
    cfg = spec.train
    batch_layout(cfg, world_size)
    plan = plan_run(spec, data.info.vocab_size)
    if cfg.warmup_steps(plan.steps) >= plan.steps:
        raise ValueError(f"train.warmup_min_steps: warmup of {cfg.warmup_steps(plan.steps)} steps is not shorter than "
                         f"the run's {plan.steps} steps")
    data.val_blocks(seq_len=cfg.seq_len, max_blocks=1)  # raises if the val split is too short
    if data.num_train_blocks(cfg.seq_len) < 1:
        raise DataError(f"data: {data_dir} has no training block of seq_len+1={cfg.seq_len + 1} tokens")
    return data, plan


def deepspeed_config(cfg: TrainConfig, micro: int, accumulation: int, bf16: bool) -> dict:
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,
    }


def train(spec: RunSpec, data_dir: str | Path, out_dir: str | Path, *, reporter: Reporter | None = None,
          resume_from: str | Path | None = None, stop_at: int | None = None, verbose: bool = True) -> TrainResult | None:
    """Train one run to its budget and evaluate it; returns the result on every rank.

    Resumes from `resume_from` (a DeepSpeed checkpoint folder) or else from out_dir/checkpoints when
    one is there. `stop_at` ends early after checkpointing that step (returns None): an interruption
    on purpose, for tests and time-limited jobs.
    """
    distributed.configure_accelerator()
    import deepspeed  # after the accelerator is chosen

    rank, world = distributed.ensure_process_group()
    reporter = reporter or Reporter()
    cfg, objective = spec.train, FAMILIES[spec.family]
    data, plan = check_run(spec, data_dir, world)
    micro, accumulation = batch_layout(cfg, world)
    device = distributed.device_for_rank()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every attempt
    model = Transformer(ModelConfig(spec.shape, data.info.vocab_size, cfg.seq_len, objective.causal))
    params_total = model.total_params()  # before ZeRO-3 partitions the parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, micro, accumulation, bf16))

    start = 0
    source = Path(resume_from) if resume_from else (ckpt_dir if (ckpt_dir / "latest").exists() else None)
    if source is not None:
        _, client = engine.load_checkpoint(str(source))
        start = int(client["step"])
    if verbose and rank == 0:
        print(f"[{spec.run_name}] {spec.family} N={spec.shape.non_embedding_params():,} D={plan.tokens:,} tokens "
              f"C={plan.flops:.3g} steps={plan.steps} world={world} zero={cfg.zero_stage}"
              + (f" resuming at step {start}" if start else ""), flush=True)

    real_flops_per_token = flops_per_token(spec.shape, data.info.vocab_size, cfg.seq_len, "palm")
    peak = _peak_flops(device) * world if device.type == "cuda" else None
    rows, clock, started = [], time.perf_counter(), time.perf_counter()
    tokens_since = 0
    end = plan.steps if stop_at is None else min(stop_at, plan.steps)
    for step in range(start, end):
        lr = lr_at(step, plan.steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        times = diffusion_times(cfg.batch_size, generator(cfg.seed, step, 0), cfg.t_sampling == "stratified")
        step_loss = 0.0
        for m in range(accumulation):
            shard = rank * accumulation + m  # a virtual rank: the global batch is the same however it is split
            block = data.train_batch(step=step, rank=shard, world_size=world * accumulation, batch_size=micro,
                                     seq_len=cfg.seq_len, seed=cfg.seed).to(device)
            t = times[shard * micro:(shard + 1) * micro].to(device)
            u = torch.rand(block.shape[0], cfg.seq_len, generator=generator(cfg.seed, step, 1, shard)).to(device)
            loss = objective.loss(engine, block, t, u, cfg.mdm_eps).mean()
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accumulation
        rows.append({"step": step + 1, "loss": step_loss, "lr": lr})
        tokens_since += plan.tokens_per_step

        last = step + 1 == end
        if (step + 1) % cfg.log_every == 0 or last:
            losses = _mean_over_ranks([r["loss"] for r in rows], world)
            elapsed = time.perf_counter() - clock
            rate = tokens_since / elapsed
            for r, value in zip(rows, losses):
                r.update(loss=value, tokens=r["step"] * plan.tokens_per_step,
                         flops=r["step"] * plan.tokens_per_step * plan.flops_per_token, tokens_per_s=rate)
                if peak:
                    r["mfu"] = rate * real_flops_per_token / peak
            if not all(math.isfinite(v) for v in losses):
                raise Diverged(f"loss became {losses[-1]} at step {rows[-1]['step']}")
            if rank == 0:
                reporter.metrics(rows)
                if verbose:
                    _print_progress(rows[-1], plan, rate)
            rows, clock, tokens_since = [], time.perf_counter(), 0
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or (last and not step + 1 == plan.steps):
            _save_checkpoint(engine, ckpt_dir, step + 1)
            reporter.checkpoint(step + 1, ckpt_dir, {"step": step + 1})
    if end < plan.steps:
        return None

    val = data.val_blocks(seq_len=cfg.seq_len, max_blocks=cfg.val_blocks).to(device)
    val_loss, val_stderr = _evaluate(spec, engine, val, rank, world)
    seconds = time.perf_counter() - started
    result = TrainResult(
        run_hash=spec.run_hash, family=spec.family, model=spec.shape.label, params=spec.shape.non_embedding_params(),
        params_total=params_total, budget=spec.budget, tokens=plan.tokens, flops=plan.flops,
        flops_convention=cfg.flops_convention, steps=plan.steps, val_loss=val_loss, val_stderr=val_stderr,
        world_size=world, seconds=seconds, tokens_per_s=(plan.steps - start) * plan.tokens_per_step / seconds,
        resumed_from_step=start)
    # ZeRO-3 holds a shard per rank: every rank takes part in gathering the full weights
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3 else engine.module.state_dict()
    if rank == 0:
        _save_final(state, spec, data.info, result, out_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # optimizer state is dead weight once model.pt is written
    dist.barrier()
    return result


def _evaluate(spec: RunSpec, engine, val: torch.Tensor, rank: int, world: int) -> tuple[float, float]:
    """Each rank scores every world-th sequence; ranks do equal work (ZeRO-3 gathers weights in lockstep)."""
    cfg, n = spec.train, len(val)
    per_rank = math.ceil(n / world)
    mine = [i % n for i in range(rank, per_rank * world, world)]
    values = sequence_losses(spec.family, engine, val, mine, samples=cfg.eval_samples, seed=cfg.seed,
                             batch_size=cfg.eval_batch_size, eps=cfg.mdm_eps, stratified=cfg.t_sampling == "stratified")
    gathered = torch.zeros(n, dtype=torch.float64)
    keep = [k for k, i in enumerate(range(rank, per_rank * world, world)) if i < n]
    gathered[[mine[k] for k in keep]] = values[keep]
    if world > 1:
        dist.all_reduce(gathered)
    return mean_and_stderr(gathered)


def _mean_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / world).tolist()


def _save_checkpoint(engine, ckpt_dir: Path, step: int) -> None:
    """Every rank writes its shard; older tags go once the new one is complete."""
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    dist.barrier()
    if dist.get_rank() == 0:
        for old in ckpt_dir.glob("step*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _save_final(state: dict, spec: RunSpec, info, result: TrainResult, out_dir: Path) -> None:
    """Plain fp32 weights and the run's description, loadable without DeepSpeed (sampling, scoring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float().cpu() for k, v in state.items()}, out_dir / "model.pt")
    description = {"spec": spec.identity(), "run_name": spec.run_name, "data": str(info.path),
                   "vocab_size": info.vocab_size, "result": asdict(result)}
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(description, indent=2))
    os.replace(tmp, out_dir / "result.json")  # written last: its presence means the run is complete


def _peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def _print_progress(row: dict, plan: BudgetPlan, rate: float) -> None:
    remaining = (plan.steps - row["step"]) * plan.tokens_per_step / rate
    mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
    print(f"  step {row['step']}/{plan.steps} | tokens {row['tokens']:.3g} | loss {row['loss']:.4f} | "
          f"lr {row['lr']:.2e} | {rate:,.0f} tok/s{mfu} | ETA {remaining:,.0f}s", flush=True)
