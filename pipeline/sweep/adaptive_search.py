"""The adaptive planner as a Ray Tune search algorithm: Tune asks for the next trial, the planner hands out
the points it has placed, and places more from MLflow's finished runs each time a trial completes.

It keeps no state worth saving: every decision is re-derived from the sweep file and the tracking store, so
a rerun after a kill rebuilds it by asking the planner again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from pipeline import tracking
from pipeline.sweep.adaptive import Schedule, schedule
from pipeline.sweep.grid import GridPoint
from pipeline.sweep.schema import SweepConfig

DECISIONS_FILE = "decisions.txt"  # on the sweep's parent run


@dataclass(frozen=True)
class PlannerInputs:
    """What the planner reads besides the finished runs (plain data: Tune pickles its search algorithm)."""
    sweep: SweepConfig
    vocab_size: int
    data_fingerprint: str
    train_blocks: int | None
    tracking_uri: str
    parent_run_id: str
    rerun_failed: bool = False


class PlannerSearch(Searcher):
    """Hands out each placed point once, in the order `order` gives the points ready to run, and ends the sweep
    when nothing is running and the planner places nothing new. Points that failed before count as settled,
    unless the sweep reruns them: then they are settled once they failed again in this session."""

    def __init__(self, inputs: PlannerInputs, order: Callable[[list[GridPoint]], list[GridPoint]]):
        super().__init__()
        self.inputs, self.order = inputs, order
        self.released: set[str] = set()
        self.running: dict[str, str] = {}  # trial id -> run hash
        self.queue: list[GridPoint] = []
        self.said: set[str] = set()  # decisions printed so far
        self.stale = True
        self.last = Schedule()  # the latest schedule: what the sweep's summary says is still waiting

    def suggest(self, trial_id: str):
        if self.stale:
            self.refresh()
        if not self.queue:
            return None if self.running else Searcher.FINISHED
        point = self.queue.pop(0)
        self.released.add(point.spec.run_hash)
        self.running[trial_id] = point.spec.run_hash
        return {"spec": point.spec.to_dict()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.running.pop(trial_id, None)
        self.stale = True

    def refresh(self) -> Schedule:
        inputs = self.inputs
        stored = tracking.settled_results(inputs.tracking_uri, inputs.sweep.name) or {}
        results = {h: loss for h, loss in stored.items()
                   if loss is not None or not inputs.rerun_failed or h in self.released}
        planned = schedule(inputs.sweep, inputs.vocab_size, results, inputs.data_fingerprint, inputs.train_blocks)
        self.queue = self.order([p for p in planned.points
                                 if p.spec.run_hash not in results and p.spec.run_hash not in self.released])
        self.stale = False
        new = [line for line in planned.decisions if line not in self.said]
        if new:  # a later family's decisions may come first in the list, so new ones are found by their text
            for line in new:
                print(f"[planner] {line}", flush=True)
            self.said.update(new)
            MlflowClient(inputs.tracking_uri).log_text(inputs.parent_run_id, "\n".join(planned.decisions) + "\n",
                                                       DECISIONS_FILE)
        self.last = planned
        return planned

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun re-derives every decision (module docstring)."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore (see save)."""
