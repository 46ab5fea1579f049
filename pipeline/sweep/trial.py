"""The code that runs inside Ray for one grid point: a Tune function trial that skips a finished point, takes
the point's lease, and trains it in the trial itself (one worker) or in a Ray Train worker group (several),
logging to the point's MLflow run by its hash.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import tracking
from pipeline.data.dataset import load_dataset
from pipeline.mlflow_keys import FINISHED
from pipeline.recipe import RunSpec
from pipeline.sweep.leases import PointClaim
from pipeline.sweep.outcome import Outcome
from pipeline.sweep.point_logs import output_to, point_log
from pipeline.sweep.schema import Resources, variant_label
from pipeline.training import kept_checkpoints
from pipeline.training.distributed import device_for_rank, ensure_process_group
from pipeline.training.loop import Diverged, Reporter, train
from pipeline.training.run_folder import RunFolder

# Ray Train sends a worker's print() to its logger as well, which writes it to stderr: in a point's log file,
# where stdout and stderr both go, every line would appear twice
QUIET_WORKERS = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


CLAIM_POLL_SECONDS = 10.0  # how often a trial waiting on another sweep's training of its point looks again


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its own spec (passed to the Ray processes)."""
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data_dir: str
    storage: str
    resources: Resources
    search_keys: tuple[str, ...] = ()  # the sweep's searched recipe keys, which name a run's variant
    quiet: bool = True  # each point's output to its log file (pipeline.sweep.point_logs), not through Ray to the driver

    def logger(self, spec: RunSpec) -> tracking.RunLogger:
        return tracking.RunLogger(self.tracking_uri, self.experiment_id, spec, self.parent_run_id,
                                  variant_label(spec.train, self.search_keys), source=f"isoflop sweep {self.name}")


def run_trial(config: dict, context: SweepContext) -> None:
    """One grid point, in a Tune function trial: skip it if finished, else take its lease (waiting while
    another sweep trains it) and train it.

    A one-worker point trains right here in the trial process: a Ray Train worker group would add an
    actor, a placement group and seconds of start-up to runs that may last seconds. Several workers
    get a Ray Train TorchTrainer named by the run hash, whose FailureConfig restarts lost workers.
    Either way checkpoints live in {storage}/runs/{run hash}/, so any restart resumes from the last one.
    """
    spec = RunSpec(**config["spec"])
    with point_output(spec, context):
        claim = claim_point(spec, context)
        if claim is None:  # another sweep finished it since this one was planned
            tune.report({"status": Outcome.SKIPPED})
            return
        try:
            tune.report(train_claimed(spec, config, context))
        finally:
            claim.release()


def point_output(spec: RunSpec, context: SweepContext):
    """Where this process's output goes while it works on the point: its log file, unless the sweep is verbose."""
    return output_to(point_log(context.storage, spec.run_name)) if context.quiet else contextlib.nullcontext()


def claim_point(spec: RunSpec, context: SweepContext) -> PointClaim | None:
    """This trial's lease on the point, waiting while another sweep's live trial trains it; None once the
    point is finished (by this sweep's plan being stale, or by that other trial)."""
    client = MlflowClient(context.tracking_uri)

    def finished() -> bool:
        return tracking.run_status(client, context.experiment_id, spec.run_hash)[0] == FINISHED

    if finished():
        return None
    logger = context.logger(spec)  # finds (or creates) the point's run once: its id does not change while waiting
    claim = PointClaim(logger.client, logger.run_id)
    said = False
    while not claim.take():
        if not said:
            print(f"[{spec.run_name}] another sweep is training this point (lease {claim.holder()}); waiting", flush=True)
            tune.report({"waiting_on": claim.holder()})
            said = True
        time.sleep(CLAIM_POLL_SECONDS)
        if finished():
            return None
    return claim


def train_claimed(spec: RunSpec, config: dict, context: SweepContext) -> dict:
    """Train a point this trial holds: here for one worker, in a Ray Train worker group for several."""
    res = context.resources
    if res.workers_per_trial == 1 and not res.worker_group:
        torch.set_num_threads(max(1, int(res.cpus_per_worker)))
        outcome = train_point(spec, context, tune.report, config.get("start"))
    else:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"spec": config["spec"], "context": context, "start": config.get("start")},
            scaling_config=ray.train.ScalingConfig(
                num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
                resources_per_worker={"CPU": res.cpus_per_worker,
                                      **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(name=spec.run_hash, storage_path=context.storage,
                                           failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
                                           callbacks=[TuneReportCallback()],  # the workers' reports reach Tune
                                           worker_runtime_env=QUIET_WORKERS if context.quiet else None))
        try:
            trainer.fit()
        except Exception as err:
            context.logger(spec).fail(f"{type(err).__name__}: {err}")
            raise
        status, reason = tracking.run_status(MlflowClient(context.tracking_uri), context.experiment_id, spec.run_hash)
        outcome = {"status": Outcome.FINISHED if status == FINISHED else Outcome.of_reason(reason)}
    return outcome


def train_worker(config: dict) -> None:
    """A Ray Train worker of a multi-worker point."""
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    context: SweepContext = config["context"]
    torch.set_num_threads(max(1, int(context.resources.cpus_per_worker)))
    spec = RunSpec(**config["spec"])
    with point_output(spec, context):
        train_point(spec, context, ray.train.report, config.get("start"))


# what a log window tells the sweep's driver (pipeline.sweep.progress)
PROGRESS_KEYS = ("step", "loss", "tokens", "tokens_per_s")


# Windows reach the driver at most this often: its display needs no more, and Ray Train's controller takes a
# worker's report once per 2 s poll, holding a rank that reports sooner until then.
REPORT_EVERY_SECONDS = 3.0


class SweepReporter(Reporter):
    """Rank 0's rows to MLflow; log windows, at most one per REPORT_EVERY_SECONDS, from every rank to Ray
    (Tune's report in a one-worker trial, Train's, which is collective, in a worker group), which hands rank 0's
    to the driver's progress display."""

    def __init__(self, logger: tracking.RunLogger | None, report: Callable[[dict], None], world: int):
        self.logger, self.report, self.world = logger, report, world
        self.last = float("-inf")

    def metrics(self, rows: list[dict]) -> None:
        if self.logger:
            self.logger.log_metrics(rows)

    def progress(self, row: dict, steps: int) -> None:
        if self.due():
            self.last = time.monotonic()
            self.report({**{key: row[key] for key in PROGRESS_KEYS}, "steps": steps})

    def due(self) -> bool:
        """Rank 0's clock decides for every rank, since a collective report must be made by all or none."""
        due = time.monotonic() - self.last >= REPORT_EVERY_SECONDS
        if self.world == 1:
            return due
        flag = torch.tensor([float(due)], device=device_for_rank())
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def train_point(spec: RunSpec, context: SweepContext, report: Callable[[dict], None], start: dict | None = None) -> dict:
    """Train (or resume) one grid point on this rank; rank 0 records it in MLflow. Returns a status dict.

    `start`, for a ladder's branch: {"from": the stable run's kept checkpoint at the branch step, "tags": the run's
    links to it}. The point's own checkpoint, once it has one, comes first: a branch killed midway resumes there.
    """
    rank, world = ensure_process_group()
    folder = RunFolder.of_point(context.storage, spec.run_hash)
    resume_from = None
    if start and not kept_checkpoints.has_checkpoint(folder.checkpoints):
        resume_from = Path(start["from"])
        if not kept_checkpoints.is_kept(resume_from):
            raise RuntimeError(f"ladder: {spec.run_name} branches from {resume_from}, which is not a complete kept "
                               "checkpoint of its stable run (rerun the sweep: the stable run trains it again)")
    logger = None
    if rank == 0:
        logger = context.logger(spec)
        if start:
            logger.tag(start["tags"])
        info = load_dataset(context.data_dir).info
        logger.log_params(tracking.run_params(spec, spec.plan(info.vocab_size, info.train_blocks(spec.train.seq_len)),
                                              world, info),
                          {"run": spec.to_dict(), "sweep": context.name})
    monitor = logger.watch_system() if logger else None
    try:
        result = train(spec, context.data_dir, folder.path, reporter=SweepReporter(logger, report, world),
                       resume_from=resume_from)
    except Diverged as err:  # a property of the run, not a crash: recorded and not retried
        if logger:
            print(f"[{spec.run_name}] diverged: {err}", flush=True)  # into the point's log
            logger.fail(Outcome.reason(Outcome.DIVERGED, str(err)))
        return {"status": Outcome.DIVERGED}
    finally:
        if monitor:  # on every exit; on success before finish() ends the run, so its last samples are kept
            monitor.finish()
    if logger:
        logger.finish(asdict(result), folder.files)
    return {"status": Outcome.FINISHED}
