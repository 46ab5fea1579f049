"""`isoflop sweep`: one Ray Tune trial per grid point, each a Ray Train run of the DeepSpeed loop, logged to MLflow.

Identity does the bookkeeping: a grid point's hash names its MLflow run and its Train run, so a
re-run skips what finished, resumes what was interrupted from its last checkpoint, and runs the rest.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from pipeline import tracking
from pipeline.errors import SweepError
from pipeline.mlflow_keys import FAILED, FINISHED
from pipeline.recipe import RunSpec
from pipeline.sweep.adaptive_search import PlannerInputs, PlannerSearch
from pipeline.sweep.grid import GridPoint, format_grid, spent_warnings
from pipeline.sweep.outcome import Outcome
from pipeline.sweep.plan import (SweepPlan, format_loss_ranges, plan_sweep, resources_error, trial_resources,
                                 trials_that_fit)
from pipeline.sweep.progress import SweepBoard, SweepProgress
from pipeline.sweep.trial import SweepContext, run_trial


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
    for reason in plan.dropped if not plan.schedule else ():  # the planner's decisions say what it left out
        print(f"dropped: {reason}")
    if dry_run:
        if plan.schedule:
            print("\n".join(f"[planner] {line}" for line in plan.schedule.decisions))
        print(format_grid(plan.points))
        for warning in spent_warnings(plan.points):
            print(warning)
        print(f"{len(plan.points)} runs, {sum(p.plan.flops for p in plan.points):.3g} FLOPs in all "
              f"({sum(p.plan.flops_spent for p in plan.points):.3g} spent)"
              + (" placed so far; the planner places the rest as these finish" if plan.schedule else ""))
        if plan.schedule:
            print("\n".join(f"waiting: {line}" for line in plan.schedule.waiting))
        print(format_loss_ranges(tracking.measured_losses(plan.tracking_uri, plan.sweep.name)))
        return 0
    todo, failed = pending_points(plan, rerun_failed)
    if not todo and not (plan.schedule and plan.schedule.waiting):
        return 0 if not failed else 1
    client = MlflowClient(plan.tracking_uri)
    parent = tracking.open_sweep_parent(client, plan.experiment_id, plan.sweep.name, Path(path), format_grid(plan.points))
    status = FAILED  # the sweep's run ends FINISHED only when every point did, KILLED when interrupted
    # log_to_driver applies to this driver alone, so it also quiets a cluster joined through an address
    ray.init(address=address, num_cpus=local and local["CPU"], num_gpus=local and local["GPU"],
             include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    try:
        searcher = plan.schedule and PlannerSearch(PlannerInputs(plan.sweep, *plan.data, plan.tracking_uri, parent,
                                                                 rerun_failed), order=longest_first)
        results = run_trials(plan, todo, parent, quiet=not verbose, searcher=searcher)
        outcome = [r.metrics.get("status") if r.error is None else Outcome.ERRORED for r in results]
        unfinished = len(outcome) - outcome.count(Outcome.FINISHED) - outcome.count(Outcome.SKIPPED)
        status = FAILED if unfinished or failed else FINISHED
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ray.shutdown()
        client.set_terminated(parent, status)
    for line in searcher.last.waiting if searcher else []:
        print(f"not placed: {line} (rerun the sweep once that has finished)")
    diverged = outcome.count(Outcome.DIVERGED)
    print(f"sweep {plan.sweep.name}: {outcome.count(Outcome.FINISHED)} trained, {diverged} diverged, "
          f"{unfinished - diverged} errored, {outcome.count(Outcome.SKIPPED)} finished by another sweep "
          f"meanwhile; results in MLflow experiment '{plan.sweep.name}' at {plan.tracking_uri}")
    return 1 if status == FAILED else 0


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


def run_trials(plan: SweepPlan, todo: list[GridPoint], parent_run_id: str, quiet: bool = True,
               searcher: PlannerSearch | None = None):
    """One Tune trial per point on the connected Ray cluster, as many at once as its resources hold, shown
    by a SweepProgress (a live table on a terminal, plain lines elsewhere). The points are `todo`, or those
    the adaptive planner's `searcher` hands out as earlier ones finish."""
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
    points = {} if searcher else {"param_space": {"spec": tune.grid_search([p.spec.to_dict() for p in longest_first(todo)])}}
    tuner = tune.Tuner(
        trainable, **points,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True, search_alg=searcher,
                                    num_samples=-1 if searcher else 1,
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
