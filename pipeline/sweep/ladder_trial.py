"""What runs inside Ray for a ladder sweep (pipeline/sweep/ladder.py): a stable run's trial, and everything else
handed to the ordinary grid-point trial (a branch is its point's run, started from a stable checkpoint).

A stable run trains its longest branch's run up to that branch's decay, from its newest usable checkpoint, keeping
a checkpoint at each branch step still needed. It has an MLflow run of its own (tagged `isoflop.ladder.stable`,
not a grid point: the analysis never sees it) with its loss curve and a lease, so two sweeps never train it at once.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import tracking
from pipeline.mlflow_keys import FINISHED, STABLE_TAG
from pipeline.recipe import RunSpec
from pipeline.sweep.leases import PointClaim
from pipeline.sweep.outcome import Outcome
from pipeline.sweep.point_logs import output_to, point_log
from pipeline.sweep.schema import variant_label
from pipeline.sweep.trial import (CLAIM_POLL_SECONDS, QUIET_WORKERS, SweepContext, SweepReporter, run_trial)
from pipeline.training import kept_checkpoints
from pipeline.training.distributed import ensure_process_group
from pipeline.training.loop import Diverged, train

STABLE = "stable"  # the role of a stable run's trial in its config's "ladder" entry


@dataclass(frozen=True)
class StableJob:
    """A stable run's trial, as plain data in its Tune config: where it lives and what it must checkpoint."""
    run_hash: str
    run_name: str
    warmup: int
    needed: tuple[int, ...]  # branch steps to checkpoint, first to last; it trains to the last

    @classmethod
    def of(cls, config: dict) -> StableJob:
        fields = {k: v for k, v in config["ladder"].items() if k != "role"}
        return cls(**{**fields, "needed": tuple(fields["needed"])})

    def config(self, spec: RunSpec) -> dict:
        """The trial's Tune config: the longest branch's spec, and this job."""
        return {"spec": spec.to_dict(), "ladder": {"role": STABLE, "run_hash": self.run_hash, "run_name": self.run_name,
                                                   "warmup": self.warmup, "needed": list(self.needed)}}

    def checkpoints(self, storage: str | Path) -> Path:
        return stable_checkpoints(storage, self.run_hash)


def stable_checkpoints(storage: str | Path, run_hash: str) -> Path:
    """A stable run's checkpoint folder: DeepSpeed's tags, the kept ones at branch steps among them."""
    return Path(storage) / "ladder" / run_hash / "checkpoints"


def run_ladder_trial(config: dict, context: SweepContext) -> None:
    """The trial of a ladder sweep: a stable run here, anything else (a branch, a point alone) as every point."""
    if config.get("ladder", {}).get("role") != STABLE:
        return run_trial(config, context)
    job = StableJob.of(config)
    spec = RunSpec(**config["spec"])
    with output_to(point_log(context.storage, job.run_name)) if context.quiet else contextlib.nullcontext():
        logger = stable_logger(spec, job, context)
        claim = PointClaim(logger.client, logger.run_id)
        while not claim.take():  # another sweep trains it: wait, then train what it left
            tune.report({"waiting_on": str(claim.holder())})
            time.sleep(CLAIM_POLL_SECONDS)
        try:
            if not missing(job, context.storage):  # that other sweep left nothing to train
                logger.client.set_terminated(logger.run_id, FINISHED)
                tune.report({"status": Outcome.SKIPPED})
                return
            tune.report(train_stable_claimed(spec, job, config, context))
        finally:
            claim.release()


def missing(job: StableJob, storage: str) -> list[int]:
    return [step for step in job.needed if step not in kept_checkpoints.kept_steps(job.checkpoints(storage))]


def stable_logger(spec: RunSpec, job: StableJob, context: SweepContext) -> tracking.RunLogger:
    return tracking.RunLogger(context.tracking_uri, context.experiment_id, spec, context.parent_run_id,
                              variant_label(spec.train, context.search_keys), source=f"isoflop sweep {context.name}",
                              key=(STABLE_TAG, job.run_hash, job.run_name))


def train_stable_claimed(spec: RunSpec, job: StableJob, config: dict, context: SweepContext) -> dict:
    """Train a stable run this trial holds: here for one worker, in a Ray Train worker group for several."""
    res = context.resources
    if res.workers_per_trial == 1 and not res.worker_group:
        torch.set_num_threads(max(1, int(res.cpus_per_worker)))
        return train_stable(spec, job, context, tune.report)
    trainer = TorchTrainer(
        stable_worker, train_loop_config={"spec": config["spec"], "job": job, "context": context},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker,
                                  **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(name=job.run_hash, storage_path=context.storage,
                                       failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
                                       callbacks=[TuneReportCallback()],
                                       worker_runtime_env=QUIET_WORKERS if context.quiet else None))
    trainer.fit()
    return {"status": Outcome.FINISHED if not missing(job, context.storage) else Outcome.FAILED}


def stable_worker(config: dict) -> None:
    """A Ray Train worker of a multi-worker stable run."""
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    context: SweepContext = config["context"]
    torch.set_num_threads(max(1, int(context.resources.cpus_per_worker)))
    job = config["job"]
    with output_to(point_log(context.storage, job.run_name)) if context.quiet else contextlib.nullcontext():
        train_stable(RunSpec(**config["spec"]), job, context, ray.train.report)


def train_stable(spec: RunSpec, job: StableJob, context: SweepContext, report) -> dict:
    """Train the stable run on this rank from its newest checkpoint at or before the first missing step to the
    last, keeping a checkpoint at each; rank 0 logs its loss curve to its MLflow run."""
    from pipeline.sweep.ladder import start_step  # pure planning; imported here to keep the trial's imports light

    rank, world = ensure_process_group()
    folder = job.checkpoints(context.storage)
    needed = tuple(missing(job, context.storage))
    start = start_step(needed, kept_checkpoints.kept_steps(folder), kept_checkpoints.latest_step(folder))
    resume_from = None if start is None else folder / kept_checkpoints.tag(start)
    if start is None and rank == 0:  # from the first step: a newer checkpoint than the first missing step is no use
        # (the other ranks look for it only after the engine's set-up, a collective rank 0 has not entered yet)
        (folder / kept_checkpoints.LATEST).unlink(missing_ok=True)
    logger = stable_logger(spec, job, context) if rank == 0 else None
    if logger:
        logger.log_params({"family": spec.family, "model": spec.shape.label, "params": str(spec.shape.non_embedding_params()),
                           "seed": str(spec.train.seed), "warmup_steps": str(job.warmup), "stable_hash": job.run_hash},
                          {"stable_run": job.run_hash, "longest_branch": spec.to_dict(), "sweep": context.name})
    end = needed[-1]
    if rank == 0:  # the loop announces the run it trains, its longest branch's: say what this stable run is
        print(f"[{job.run_name}] stable run: {spec.run_name}'s steps to {end}, keeping checkpoints at "
              f"{', '.join(map(str, needed))}; from step {start or 0}", flush=True)

    def progress(metrics: dict) -> None:  # the display counts a stable run's steps to its end, not its spec's
        report({**metrics, "steps": end} if "steps" in metrics else metrics)

    try:
        train(spec, context.data_dir, folder.parent, reporter=SweepReporter(logger, progress, world),
              resume_from=resume_from, stop_at=end, keep_at=frozenset(needed))
    except Diverged as err:
        if logger:
            print(f"[{job.run_name}] diverged: {err}", flush=True)
            logger.fail(Outcome.reason(Outcome.DIVERGED, str(err)))
        return {"status": Outcome.DIVERGED}
    if logger:
        logger.client.set_terminated(logger.run_id, FINISHED)
    return {"status": Outcome.FINISHED}
