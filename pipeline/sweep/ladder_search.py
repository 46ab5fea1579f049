"""A ladder sweep's trials under Ray Tune (pipeline/sweep/ladder.py): a Tune search algorithm that hands out the
stable runs first, longest first, then each branch once its stable run's checkpoint at the branch step exists
(or once it has a checkpoint of its own), and the points that train alone, longest first. When a branch
finishes, the stable checkpoint it started from goes, once every branch at that step has finished.

Like the adaptive planner's (pipeline/sweep/adaptive_search.py) it keeps no state worth saving: a rerun after a
kill derives the work left from MLflow's finished runs and the checkpoints on disk (`ladder.ladder_work`).
"""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from pipeline import tracking
from pipeline.mlflow_keys import BRANCH_OF_TAG, BRANCH_STEP_TAG, FINISHED
from pipeline.sweep.grid import GridPoint
from pipeline.sweep.ladder import Branch, LadderWork, StableRun, finished_steps
from pipeline.sweep.ladder_trial import StableJob, stable_checkpoints
from pipeline.sweep.outcome import Outcome
from pipeline.sweep.progress import PointState
from pipeline.training import kept_checkpoints
from pipeline.training.run_folder import RunFolder


@dataclass(frozen=True)
class Job:
    """One trial of a ladder sweep: a stable run (with `needed` steps), a branch of `run`, or a point alone."""
    run: StableRun | None = None
    needed: tuple[int, ...] = ()
    branch: Branch | None = None
    point: GridPoint | None = None

    @property
    def tokens(self) -> int:
        """What it trains, for the longest-first order (tokens, as pipeline.sweep.driver.longest_first says why)."""
        if self.branch:
            return self.branch.steps * self.branch.point.plan.tokens_per_step
        if self.point:
            return self.point.plan.tokens
        return self.needed[-1] * self.run.longest.plan.tokens_per_step

    def config(self, storage: str) -> dict:
        if self.point:
            return {"spec": self.point.spec.to_dict()}
        if self.branch:
            step = self.branch.step
            return {"spec": self.branch.point.spec.to_dict(),
                    "start": {"from": str(stable_checkpoints(storage, self.run.run_hash) / kept_checkpoints.tag(step)),
                              "tags": {BRANCH_OF_TAG: self.run.run_hash, BRANCH_STEP_TAG: str(step)}}}
        return StableJob(self.run.run_hash, self.run.run_name, self.run.warmup, self.needed).config(self.run.spec)

    def state(self) -> PointState:
        """Its row on the sweep's progress board."""
        if self.point:
            return PointState.of(self.point.spec)
        if self.branch:
            b = self.branch
            return PointState(b.point.spec.run_name, b.point.spec.family, b.point.spec.shape.label, b.point.spec.budget,
                              role=f"branch from {b.step}", first=b.step, work=b.flops)
        spec = self.run.spec
        return PointState(self.run.run_name, spec.family, spec.shape.label, spec.budget, role="stable",
                          work=self.run.longest.plan.flops * self.needed[-1] / self.run.longest.plan.steps)

    @property
    def key(self) -> str:
        """The trial's key on the progress board (pipeline.sweep.progress.trial_key)."""
        if self.point:
            return self.point.spec.run_hash
        return self.branch.point.spec.run_hash if self.branch else self.run.run_hash


def jobs_of(work: LadderWork) -> list[Job]:
    """Every trial of the work left: the stable runs first, then the others, each longest first."""
    stable = [Job(run=run, needed=needed) for run, needed in work.stable]
    rest = [Job(run=run, branch=branch) for run, branch in work.branches] + [Job(point=p) for p in work.alone]
    by_tokens = lambda jobs: sorted(jobs, key=lambda j: j.tokens, reverse=True)  # noqa: E731
    return by_tokens(stable) + by_tokens(rest)


class LadderSearch(Searcher):
    """Hands out `jobs` in order, a branch only once it can start; ends the sweep when all are out and nothing
    runs. A branch whose stable run ended without its checkpoint (it failed) is left out and listed in `blocked`;
    `diverged` holds the stable runs that diverged (their later branches would have too)."""

    def __init__(self, jobs: list[Job], storage: str, tracking_uri: str, experiment_id: str):
        super().__init__()
        self.waiting, self.storage = list(jobs), storage
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.running: dict[str, Job] = {}
        self.stable_open = {j.run.run_hash for j in jobs if not (j.branch or j.point)}
        self.blocked: list[Job] = []
        self.diverged: set[str] = set()

    def suggest(self, trial_id: str):
        job = self.next_job()
        if job is None:
            return None if self.running or self.waiting else Searcher.FINISHED
        self.waiting.remove(job)
        self.running[trial_id] = job
        return job.config(self.storage)

    def next_job(self) -> Job | None:
        for job in list(self.waiting):
            if not job.branch or self.ready(job):
                return job
            if job.run.run_hash not in self.stable_open:  # its stable run is over, without this checkpoint
                self.waiting.remove(job)
                self.blocked.append(job)
        return None

    def ready(self, job: Job) -> bool:
        own = RunFolder.of_point(self.storage, job.branch.point.spec.run_hash).checkpoints
        if kept_checkpoints.has_checkpoint(own):
            return True  # a branch resumes from its own checkpoint first; the stable run's is read only without it
        return job.branch.step in kept_checkpoints.kept_steps(stable_checkpoints(self.storage, job.run.run_hash))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        job = self.running.pop(trial_id, None)
        if job is None or job.point:
            return
        if not job.branch:
            self.stable_open.discard(job.run.run_hash)
            if (result or {}).get("status") == Outcome.DIVERGED:
                self.diverged.add(job.run.run_hash)
            return
        release_served(job.run, self.storage, finished_runs(self.tracking_uri, self.experiment_id,
                                                            [b.point.spec.run_hash for b in job.run.branches]))

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun derives the work left (module docstring)."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore (see save)."""


def finished_runs(uri: str, experiment_id: str, hashes: list[str]) -> set[str]:
    client = MlflowClient(uri)
    return {h for h in hashes if tracking.run_status(client, experiment_id, h)[0] == FINISHED}


def release_served(run: StableRun, storage: str, finished: set[str]) -> list[int]:
    """Drop the stable run's kept checkpoints whose branches have all finished; the steps dropped."""
    folder = stable_checkpoints(storage, run.run_hash)
    served = [step for step in finished_steps(run, finished) if step in kept_checkpoints.kept_steps(folder)]
    for step in served:
        kept_checkpoints.drop(folder, step)
    return served
