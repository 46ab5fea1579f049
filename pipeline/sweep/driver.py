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
from pipeline.sweep.ladder import format_ladder, ladder_work, warmup_warnings
from pipeline.sweep.ladder_search import LadderSearch, jobs_of, release_served
from pipeline.sweep.ladder_trial import STABLE, run_ladder_trial, stable_checkpoints
from pipeline.sweep.outcome import Outcome
from pipeline.sweep.plan import (SweepPlan, format_loss_ranges, plan_sweep, resources_error, trial_resources,
                                 trials_that_fit)
from pipeline.sweep.progress import SweepBoard, SweepProgress
from pipeline.sweep.trial import SweepContext, run_trial
from pipeline.training import kept_checkpoints
from pipeline.training.run_folder import RunFolder


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
        print_dry_run(plan)
        return 0
    todo, failed = pending_points(plan, rerun_failed)
    if plan.ladder:  # checkpoints whose branches finished before the last session ended
        finished = {p.spec.run_hash for p in plan.points} - {p.spec.run_hash for p in todo + failed}
        for run in plan.ladder.stable:
            release_served(run, str(Path(plan.sweep.storage).resolve()), finished)
    if not todo and not (plan.schedule and plan.schedule.waiting):
        return 0 if not failed else 1
    client = MlflowClient(plan.tracking_uri)
    grid = format_grid(plan.points) + (f"\n{format_ladder(plan.ladder, plan.points)}" if plan.ladder else "")
    parent = tracking.open_sweep_parent(client, plan.experiment_id, plan.sweep.name, Path(path), grid)
    status = FAILED  # the sweep's run ends FINISHED only when every point did, KILLED when interrupted
    # log_to_driver applies to this driver alone, so it also quiets a cluster joined through an address
    ray.init(address=address, num_cpus=local and local["CPU"], num_gpus=local and local["GPU"],
             include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    try:
        searcher = plan.schedule and PlannerSearch(PlannerInputs(plan.sweep, *plan.data, plan.tracking_uri, parent,
                                                                 rerun_failed), order=longest_first)
        if plan.ladder:
            searcher = ladder_search(plan, todo)
        results = run_trials(plan, todo, parent, quiet=not verbose, searcher=searcher)
        roles = [((r.config or {}).get("ladder") or {}).get("role") for r in results]
        stable = [r for r, role in zip(results, roles) if role == STABLE]  # a ladder's: not grid points
        outcome = [trial_status(r) for r, role in zip(results, roles) if role != STABLE]
        unfinished = len(outcome) - outcome.count(Outcome.FINISHED) - outcome.count(Outcome.SKIPPED)
        if plan.ladder:
            unfinished += report_ladder(stable, searcher, sweep_context(plan, parent, not verbose))
        status = FAILED if unfinished or failed else FINISHED
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ray.shutdown()
        client.set_terminated(parent, status)
    for line in searcher.last.waiting if plan.schedule else []:
        print(f"not placed: {line} (rerun the sweep once that has finished)")
    diverged = outcome.count(Outcome.DIVERGED)
    print(f"sweep {plan.sweep.name}: {outcome.count(Outcome.FINISHED)} trained, {diverged} diverged, "
          f"{unfinished - diverged} errored, {outcome.count(Outcome.SKIPPED)} finished by another sweep "
          f"meanwhile; results in MLflow experiment '{plan.sweep.name}' at {plan.tracking_uri}")
    return 1 if status == FAILED else 0


def print_dry_run(plan: SweepPlan) -> None:
    """The grid, its FLOPs (a ladder's against the same grid point by point), and what is measured so far."""
    if plan.schedule:
        print("\n".join(f"[planner] {line}" for line in plan.schedule.decisions))
    print(format_grid(plan.points))
    for warning in spent_warnings(plan.points) + (warmup_warnings(plan.points) if plan.ladder else []):
        print(warning)
    print(f"{len(plan.points)} runs, {sum(p.plan.flops for p in plan.points):.3g} FLOPs in all "
          f"({sum(p.plan.flops_spent for p in plan.points):.3g} spent)"
          + (" placed so far; the planner places the rest as these finish" if plan.schedule else ""))
    if plan.ladder:
        print(format_ladder(plan.ladder, plan.points))
    if plan.schedule:
        print("\n".join(f"waiting: {line}" for line in plan.schedule.waiting))
    print(format_loss_ranges(tracking.measured_losses(plan.tracking_uri, plan.sweep.name)))


def pending_points(plan: SweepPlan, rerun_failed: bool) -> tuple[list[GridPoint], list[GridPoint]]:
    """(points to train, points that failed before and are kept as failed); prints the tally."""
    client = MlflowClient(plan.tracking_uri)
    todo, done, failed, reasons = [], [], [], []
    for point in plan.points:
        status, reason = tracking.run_status(client, plan.experiment_id, point.spec.run_hash)
        if status == FINISHED:
            done.append(point)
        elif status == FAILED and not rerun_failed:
            failed.append(point)
            reasons.append(f"{point.spec.run_name}: {reason or 'failed'}")
        else:
            todo.append(point)
    print(f"sweep {plan.sweep.name}: {len(plan.points)} points, {len(done)} finished, {len(failed)} failed "
          f"(kept; --rerun-failed runs them again), {len(todo)} to run")
    for line in reasons:
        print(f"  failed earlier: {line}")
    return todo, failed


def ladder_search(plan: SweepPlan, todo: list[GridPoint]) -> LadderSearch:
    """The trials left of a ladder sweep: stable runs for the branches that can start from no checkpoint yet,
    the branches and points still to run; prints what the stable runs will train."""
    storage = str(Path(plan.sweep.storage).resolve())
    work = ladder_work(plan.ladder, {p.spec.run_hash for p in todo},
                       kept=lambda run: kept_checkpoints.kept_steps(stable_checkpoints(storage, run.run_hash)),
                       resumable=lambda p: kept_checkpoints.has_checkpoint(
                           RunFolder.of_point(storage, p.spec.run_hash).checkpoints))
    print(f"ladder: {len(work.stable)} stable runs to train (to steps "
          f"{', '.join(str(needed[-1]) for _, needed in work.stable) or '-'}), {len(work.branches)} branches and "
          f"{len(work.alone)} points alone to run")
    return LadderSearch(jobs_of(work), storage, plan.tracking_uri, plan.experiment_id)


def sweep_context(plan: SweepPlan, parent_run_id: str, quiet: bool) -> SweepContext:
    sweep = plan.sweep
    return SweepContext(sweep.name, plan.tracking_uri, plan.experiment_id, parent_run_id,
                        str(Path(sweep.data.path).resolve()), str(Path(sweep.storage).resolve()), sweep.resources,
                        tuple(sweep.search), quiet)


def trial_status(result) -> str:
    """How a finished Tune trial ended: the status its point reported, or errored where the trial raised."""
    return result.metrics.get("status") if result.error is None else Outcome.ERRORED


def report_ladder(stable: list, searcher: LadderSearch, context: SweepContext) -> int:
    """Print how the stable runs ended and the branches that could not start; their number (unfinished work). A
    branch past the step where its stable run diverged is recorded as diverged, as its point trained whole would
    be, so that it is not retried (but by --rerun-failed)."""
    ended = [trial_status(r) for r in stable]
    bad = len(ended) - ended.count(Outcome.FINISHED) - ended.count(Outcome.SKIPPED)
    print(f"ladder: {ended.count(Outcome.FINISHED)} stable runs trained, {bad} failed")
    for job in searcher.blocked:
        spec, why = job.branch.point.spec, f"its stable run {job.run.run_name} ended before step {job.branch.step}"
        if job.run.run_hash in searcher.diverged:
            why = f"its stable run {job.run.run_name} diverged before step {job.branch.step}"
            context.logger(spec).fail(Outcome.reason(Outcome.DIVERGED, why))
        print(f"  branch not run: {spec.run_name}: {why}")
    return bad + len(searcher.blocked)


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
    context = sweep_context(plan, parent_run_id, quiet)
    board = (SweepBoard.of_states(sweep.name, {job.key: job.state() for job in searcher.waiting})
             if isinstance(searcher, LadderSearch) else SweepBoard.of(sweep.name, (p.spec for p in todo)))
    progress = SweepProgress(board, storage, logs=quiet)
    trial = run_ladder_trial if isinstance(searcher, LadderSearch) else run_trial
    trainable = tune.with_resources(tune.with_parameters(trial, context=context), trial_resources(sweep.resources))
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
    """A trial and its folder are named by the point's run name (family, shape, budget, hash), not its config; a
    ladder's stable run by its own (stable-family-shape-hash)."""
    ladder = trial.config.get("ladder") or {}
    return ladder["run_name"] if ladder.get("role") == STABLE else RunSpec(**trial.config["spec"]).run_name


def longest_first(points: list[GridPoint]) -> list[GridPoint]:
    """Longest runs first, so the last trials to start are short and no slot idles while one long run ends
    (at CPU scale a step's cost is mostly the vocabulary head, so tokens are a better guide than FLOPs)."""
    return sorted(points, key=lambda p: p.plan.tokens, reverse=True)
