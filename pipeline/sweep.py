"""Ray glue: one Tune trial per grid point, each a Ray Train run of the DeepSpeed loop, logged to MLflow.

Identity does the bookkeeping: a grid point's hash names its MLflow run and its Train run, so a
re-run skips what finished, resumes what was interrupted from its last checkpoint, and runs the rest.
"""
from __future__ import annotations

import contextlib
import logging
import math
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
from pipeline.claim import PointClaim
from pipeline.config import Resources, RunSpec, SweepConfig, variant_label
from pipeline.data import load_dataset
from pipeline.distributed import device_for_rank, ensure_process_group
from pipeline.errors import DataError, SweepError, TrackingError
from pipeline.grid import GridPoint, expand_grid, format_grid, load_sweep
from pipeline.mlflow_keys import FAILED, FINISHED, resolve_uri
from pipeline.point_logs import output_to, point_log
from pipeline.run_folder import RunFolder
from pipeline.synthetic import synthetic
from pipeline.terminal import SweepBoard, SweepProgress
from pipeline.train import Diverged, Reporter, train

# A trial that drives a Ray Train worker group only waits, so it holds no CPU (which would keep a 2-worker
# trial off a 2-core machine); Tune needs it to hold something, so it holds a little memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}
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
    quiet: bool = True  # each point's output to its log file (pipeline.point_logs), not through Ray to the driver

    def logger(self, spec: RunSpec) -> tracking.RunLogger:
        return tracking.RunLogger(self.tracking_uri, self.experiment_id, spec, self.parent_run_id,
                                  variant_label(spec.train, self.search_keys), source=f"isoflop sweep {self.name}")


@dataclass
class SweepPlan:
    sweep: SweepConfig
    points: list[GridPoint]
    dropped: list[str]
    tracking_uri: str
    experiment_id: str | None  # None for a dry run, which touches no store


def plan_sweep(path: str | Path, tracking_uri: str | None = None, *, dry_run: bool = False,
               cluster: dict | None = None) -> SweepPlan:
    """Load and check a sweep file: every problem is collected and raised together, before anything runs.

    `cluster` holds the resources a trial must fit in ({"CPU": n, "GPU": m}); None skips that check.
    """
    sweep = load_sweep(path)
    errors: list[str] = []
    data_dir = Path(sweep.data.path)
    vocab, fingerprint, train_blocks = sweep.data.vocab_size, "", None
    if not (data_dir / "meta.json").exists() and sweep.data.synthetic:  # seconds; the grid needs its vocab
        synthetic(data_dir, tokens=sweep.data.synthetic.tokens, seed=sweep.data.synthetic.seed)
    try:
        info = load_dataset(data_dir).info
        if vocab is not None and vocab != info.vocab_size:
            errors.append(f"data.vocab_size: {vocab} given, but {data_dir} has vocab {info.vocab_size}")
        vocab, fingerprint, train_blocks = info.vocab_size, info.fingerprint, info.train_blocks(sweep.train.seq_len)
    except DataError as err:
        if not (dry_run and vocab):
            errors.append(str(err) + ("" if sweep.data.synthetic else " (prepare it with `isoflop data`)"))
    points, dropped = [], []
    if vocab:
        try:
            points, dropped = expand_grid(sweep, vocab, fingerprint, train_blocks)
            if not points:
                errors.append("grid: every point was dropped:\n  " + "\n  ".join(dropped))
        except SweepError as err:
            errors.append(str(err))
    if cluster is not None and trials_that_fit(sweep.resources, cluster) < 1:
        errors.append(resources_error(sweep.resources, cluster))
    uri, experiment_id = resolve_uri(tracking_uri, sweep.tracking_uri), None
    if not dry_run:
        try:
            experiment_id = tracking.prepare_store(uri, sweep.name)
        except TrackingError as err:
            errors.append(str(err))
    if errors:
        raise SweepError("\n".join(errors))
    return SweepPlan(sweep, points, dropped, uri, experiment_id)


def trial_resources(resources: Resources) -> dict:
    """What Tune reserves for a trial: all of a one-worker point, else just the driver of its worker group."""
    if resources.workers_per_trial == 1 and not resources.worker_group:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    return DRIVER_RESOURCES


def trials_that_fit(resources: Resources, cluster: dict) -> int:
    """How many trials the cluster holds at once (Tune cannot see Train's placement groups)."""
    cpus = resources.workers_per_trial * resources.cpus_per_worker
    limit = math.floor(cluster.get("CPU", 0) / cpus)
    if resources.gpus_per_worker:
        limit = min(limit, math.floor(cluster.get("GPU", 0) / (resources.workers_per_trial * resources.gpus_per_worker)))
    return limit


def resources_error(resources: Resources, cluster: dict) -> str:
    return (f"resources: a trial needs {resources.workers_per_trial} workers x ({resources.cpus_per_worker} CPU, "
            f"{resources.gpus_per_worker} GPU), more than the cluster has ({cluster})")


def run_sweep(path: str | Path, *, address: str | None = None, tracking_uri: str | None = None,
              rerun_failed: bool = False, dry_run: bool = False, verbose: bool = False) -> int:
    """Plan, then train every point not finished yet; the exit code is 1 when any point failed.

    `address` (else $RAY_ADDRESS, which a Ray job's driver has) names a running cluster; None starts a local one.
    Each point's output goes to `{storage}/logs/{run name}.log`; `verbose` sends it, and all of Ray's, to the
    driver's terminal instead.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    local = None if address else {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}
    plan = plan_sweep(path, tracking_uri, dry_run=dry_run, cluster=None if dry_run else local)
    for reason in plan.dropped:
        print(f"dropped: {reason}")
    if dry_run:
        print(format_grid(plan.points))
        print(f"{len(plan.points)} runs, {sum(p.plan.flops for p in plan.points):.3g} FLOPs in all")
        print(format_loss_ranges(tracking.measured_losses(plan.tracking_uri, plan.sweep.name)))
        return 0
    todo, failed = pending_points(plan, rerun_failed)
    if not todo:
        return 0 if not failed else 1
    client = MlflowClient(plan.tracking_uri)
    parent = tracking.open_sweep_parent(client, plan.experiment_id, plan.sweep.name, Path(path), format_grid(plan.points))
    status = FAILED  # the sweep's run ends FINISHED only when every point did, KILLED when interrupted
    # log_to_driver applies to this driver alone, so it also quiets a cluster joined through an address
    ray.init(address=address, num_cpus=local and local["CPU"], num_gpus=local and local["GPU"],
             include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    try:
        results = run_trials(plan, todo, parent, quiet=not verbose)
        outcome = [r.metrics.get("status") if r.error is None else "errored" for r in results]
        unfinished = len(outcome) - outcome.count("finished") - outcome.count("skipped")
        status = FAILED if unfinished or failed else FINISHED
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ray.shutdown()
        client.set_terminated(parent, status)
    print(f"sweep {plan.sweep.name}: {outcome.count('finished')} trained, {outcome.count('diverged')} diverged, "
          f"{unfinished - outcome.count('diverged')} errored, {outcome.count('skipped')} finished by another sweep "
          f"meanwhile; results in MLflow experiment '{plan.sweep.name}' at {plan.tracking_uri}")
    return 1 if status == FAILED else 0


def format_loss_ranges(losses: dict[str, list[float]] | None) -> str:
    """Which losses each family's finished runs reached, and where the families overlap: a compute gap is
    measured only at losses both reach (else it extrapolates a frontier)."""
    if losses is None:
        return "losses measured so far: unknown (the tracking store cannot be read)"
    if not losses:
        return "losses measured so far: none (no finished runs yet)"
    spans = {family: (min(values), max(values)) for family, values in sorted(losses.items())}
    text = ", ".join(f"{f} {lo:.4g}-{hi:.4g} ({len(losses[f])} runs)" for f, (lo, hi) in spans.items())
    if len(spans) > 1:
        lo, hi = max(s[0] for s in spans.values()), min(s[1] for s in spans.values())
        text += f"; overlap {lo:.4g}-{hi:.4g}" if lo <= hi else "; no overlap"
    return f"losses measured so far (finished runs): {text}"


def pending_points(plan: SweepPlan, rerun_failed: bool) -> tuple[list[GridPoint], list[str]]:
    """(points to train, points that failed before and are kept as failed); prints the tally."""
    client = MlflowClient(plan.tracking_uri)
    todo, done, failed = [], [], []
    for point in plan.points:
        status, reason = tracking.run_status(client, plan.experiment_id, point.spec.run_hash)
        if status == FINISHED:
            done.append(point)
        elif status == FAILED and not rerun_failed:
            failed.append(f"{point.spec.run_name}: {reason or 'failed'}")
        else:
            todo.append(point)
    print(f"sweep {plan.sweep.name}: {len(plan.points)} points, {len(done)} finished, {len(failed)} failed "
          f"(kept; --rerun-failed runs them again), {len(todo)} to run")
    for line in failed:
        print(f"  failed earlier: {line}")
    return todo, failed


def run_trials(plan: SweepPlan, todo: list[GridPoint], parent_run_id: str, quiet: bool = True):
    """One Tune trial per point on the connected Ray cluster, as many at once as its resources hold, shown
    by a SweepProgress (a live table on a terminal, plain lines elsewhere)."""
    sweep = plan.sweep
    concurrent = trials_that_fit(sweep.resources, ray.cluster_resources())
    if concurrent < 1:  # a remote cluster, only known once connected
        raise SweepError(resources_error(sweep.resources, ray.cluster_resources()))
    if sweep.resources.max_concurrent_trials:
        concurrent = min(concurrent, sweep.resources.max_concurrent_trials)
    storage = str(Path(sweep.storage).resolve())
    context = SweepContext(sweep.name, plan.tracking_uri, plan.experiment_id, parent_run_id,
                           str(Path(sweep.data.path).resolve()), storage, sweep.resources, tuple(sweep.search), quiet)
    progress = SweepProgress(SweepBoard.of(sweep.name, (p.spec for p in todo)), storage, logs=quiet)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), trial_resources(sweep.resources))
    tuner = tune.Tuner(
        trainable,
        param_space={"spec": tune.grid_search([p.spec.to_dict() for p in longest_first(todo)])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=sweep.resources.max_failures),
                                  callbacks=[progress], verbose=0))
    try:
        with tune_output(quiet):
            return tuner.fit()
    finally:
        progress.stop()


@contextlib.contextmanager
def tune_output(quiet: bool):
    """Quiet: no experiment header (Tune's new output prints one even at verbose=0, the legacy one, chosen by
    this variable, prints nothing) and no tracebacks from Tune's logger (each point's is in its log file, and
    the progress display names the file and the error)."""
    if not quiet:
        yield
        return
    previous, logger = os.environ.get("RAY_AIR_NEW_OUTPUT"), logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        logger.setLevel(level)
        os.environ.pop("RAY_AIR_NEW_OUTPUT") if previous is None else os.environ.update(RAY_AIR_NEW_OUTPUT=previous)


def trial_name(trial) -> str:
    """A trial and its folder are named by the point's run name (family, shape, budget, hash), not its config."""
    return RunSpec(**trial.config["spec"]).run_name


def longest_first(points: list[GridPoint]) -> list[GridPoint]:
    """Longest runs first, so the last trials to start are short and no slot idles while one long run ends
    (at CPU scale a step's cost is mostly the vocabulary head, so tokens are a better guide than FLOPs)."""
    return sorted(points, key=lambda p: p.plan.tokens, reverse=True)


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
            tune.report({"status": "skipped"})
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
        outcome = train_point(spec, context, tune.report)
    else:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"spec": config["spec"], "context": context},
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
        outcome = {"status": "finished" if status == FINISHED else reason.split(":")[0] or "failed"}
    return outcome


def train_worker(config: dict) -> None:
    """A Ray Train worker of a multi-worker point."""
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    context: SweepContext = config["context"]
    torch.set_num_threads(max(1, int(context.resources.cpus_per_worker)))
    spec = RunSpec(**config["spec"])
    with point_output(spec, context):
        train_point(spec, context, ray.train.report)


# what a log window tells the sweep's driver (pipeline.terminal)
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


def train_point(spec: RunSpec, context: SweepContext, report: Callable[[dict], None]) -> dict:
    """Train (or resume) one grid point on this rank; rank 0 records it in MLflow. Returns a status dict."""
    rank, world = ensure_process_group()
    folder = RunFolder(Path(context.storage) / "runs" / spec.run_hash)
    logger = None
    if rank == 0:
        logger = context.logger(spec)
        info = load_dataset(context.data_dir).info
        logger.log_params(tracking.run_params(spec, spec.plan(info.vocab_size, info.train_blocks(spec.train.seq_len)),
                                              world, info),
                          {"run": spec.to_dict(), "sweep": context.name})
    monitor = logger.watch_system() if logger else None
    try:
        result = train(spec, context.data_dir, folder.path, reporter=SweepReporter(logger, report, world))
    except Diverged as err:  # a property of the run, not a crash: recorded and not retried
        if logger:
            print(f"[{spec.run_name}] diverged: {err}", flush=True)  # into the point's log
            logger.fail(f"diverged: {err}")
        return {"status": "diverged"}
    finally:
        if monitor:  # on every exit; on success before finish() ends the run, so its last samples are kept
            monitor.finish()
    if logger:
        logger.finish(asdict(result), folder.files)
    return {"status": "finished"}
