"""What `isoflop sweep` shows while it runs: one live table on a terminal, a plain line every 30 s elsewhere.

Each trial reports its log windows to Ray Tune (step, steps, loss, tokens, tokens/s); `SweepProgress`, a Tune
callback on the driver, keeps a `PointState` per grid point and draws them. The sweep's ETA is weighted by
FLOPs, since points differ in cost by orders of magnitude:

    FLOPs done  = budgets of the points finished in this session + step/steps x budget of the others started
    FLOPs left  = budgets of the pending and running points - what the running ones have done
    ETA         = FLOPs left / (FLOPs done / seconds since the first point started)

A ladder sweep's stable runs and branches (pipeline/sweep/ladder.py) are rows too, each weighted by the FLOPs of
the steps it trains instead of a budget.

Points that failed or were finished by another sweep leave nothing to do; a failed point's partial steps still
count as work done (its seconds were spent). A resumed point counts its checkpointed steps as done now, so
the first ETA after a resume is optimistic.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.recipe import RunSpec
from pipeline.sweep.outcome import Outcome
from pipeline.sweep.point_logs import point_log

PLAIN_EVERY_SECONDS = 30.0  # a plain progress line this often when the output is not a terminal
DRAW_EVERY_SECONDS = 0.5    # the live table is redrawn at most this often

PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"


@dataclass
class PointState:
    """One grid point as the driver last heard of it."""
    name: str               # the run name: family, shape, budget, hash
    family: str
    shape: str
    budget: float           # FLOPs
    state: str = PENDING
    step: int = 0
    steps: int = 0
    loss: float | None = None
    tokens: float = 0.0
    tokens_per_s: float | None = None
    note: str = ""          # e.g. waiting on another sweep, or why it failed
    role: str = ""          # a ladder's "stable" run or "branch from <step>"; "" for a point trained whole
    first: int = 0          # the step it starts from (a branch's branch step)
    work: float | None = None  # FLOPs of the steps it trains, in its budget's convention; None: the budget

    @classmethod
    def of(cls, spec: RunSpec) -> PointState:
        return cls(spec.run_name, spec.family, spec.shape.label, spec.budget)

    @property
    def flops(self) -> float:
        return self.budget if self.work is None else self.work

    @property
    def flops_done(self) -> float:
        if self.state == DONE:
            return self.flops
        if self.state == SKIPPED or not self.steps:
            return 0.0
        return self.flops * max(0, min(self.step, self.steps) - self.first) / max(1, self.steps - self.first)

    @property
    def flops_left(self) -> float:
        return self.flops - self.flops_done if self.state in (PENDING, RUNNING) else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds to this point's last step at its last window's rate."""
        if not (self.step and self.tokens_per_s):
            return None
        return (self.steps - self.step) * (self.tokens / self.step) / self.tokens_per_s

    def update(self, metrics: dict) -> None:
        """A result a trial reported: a log window, a wait on another sweep, or its final status."""
        if "step" in metrics:
            self.state, self.note = RUNNING, ""
            self.step, self.steps = int(metrics["step"]), int(metrics["steps"])
            self.loss, self.tokens, self.tokens_per_s = metrics["loss"], metrics["tokens"], metrics["tokens_per_s"]
        if "waiting_on" in metrics:
            self.note = f"waiting: another sweep trains it ({metrics['waiting_on']})"
        status = metrics.get("status")
        if status:
            self.state = {Outcome.FINISHED: DONE, Outcome.SKIPPED: SKIPPED}.get(status, FAILED)
            self.note = "" if self.state != FAILED else status


def format_duration(seconds: float | None) -> str:
    """45s, 3m05s, 2h04m, 3d02h; '?' when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass
class SweepBoard:
    """Every point of this session's sweep and the arithmetic over them: counts, and the FLOP-weighted ETA."""
    name: str
    points: dict[str, PointState]  # by run hash
    started: float = field(default_factory=time.monotonic)
    first_start: float | None = None  # of a point: the FLOP rate leaves out Ray's start-up before it

    @classmethod
    def of(cls, name: str, specs: Iterable[RunSpec]) -> SweepBoard:
        return cls(name, {spec.run_hash: PointState.of(spec) for spec in specs})

    @classmethod
    def of_states(cls, name: str, states: dict[str, PointState]) -> SweepBoard:
        """A board of given rows, by trial key (`trial_key`): a ladder's stable runs and branches."""
        return cls(name, dict(states))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((DONE, RUNNING, PENDING, FAILED, SKIPPED), 0)
        for point in self.points.values():
            counts[point.state] += 1
        return counts

    def eta_s(self, now: float) -> float | None:
        """FLOPs left over the FLOP rate so far (see the module's docstring); None while there is work left but
        none done yet."""
        done, left = (sum(getattr(p, key) for p in self.points.values()) for key in ("flops_done", "flops_left"))
        elapsed = now - (self.started if self.first_start is None else self.first_start)
        if not left:
            return 0.0
        return left * elapsed / done if done > 0 and elapsed > 0 else None

    def headline(self, now: float) -> str:
        c = self.counts()
        skipped = f", {c[SKIPPED]} finished by another sweep" if c[SKIPPED] else ""
        eta = self.eta_s(now)
        return (f"{c[DONE]} done, {c[RUNNING]} running, {c[PENDING]} pending, {c[FAILED]} failed{skipped} | "
                f"{format_duration(now - self.started)} elapsed | "
                f"ETA {format_duration(eta) if eta is not None else 'after the first log window'} (by FLOPs left)")

    def plain_line(self, now: float) -> str:
        """The line a log file or CI output gets (`isoflop status` reads the last one back from a Ray job)."""
        return f"[sweep] {self.headline(now)}"

    def table(self, now: float) -> Group:
        """The running points, one row each, under the sweep's counts and ETA."""
        table = Table(box=None, header_style="bold", pad_edge=False)
        ladder = any(point.role for point in self.points.values())  # a ladder sweep: which part of it a row is
        columns = (("family", "left"), ("shape", "left"), ("budget", "right"), *((("run", "left"),) if ladder else ()),
                   ("step", "right"), ("loss", "right"), ("tokens/s", "right"), ("ETA", "right"), ("", "left"))
        for column, justify in columns:
            table.add_column(column, justify=justify, no_wrap=True)
        running = [point for point in self.points.values() if point.state == RUNNING]
        for point in running:
            step = f"{point.step}/{point.steps}" if point.steps else "starting"
            budget = "" if point.role == "stable" else f"{point.budget:.3g}"  # a stable run serves several budgets
            table.add_row(point.family, point.shape, budget, *((point.role or "point",) if ladder else ()), step,
                          f"{point.loss:.4f}" if point.loss is not None else "",
                          f"{point.tokens_per_s:,.0f}" if point.tokens_per_s else "", format_duration(point.eta_s),
                          point.note)
        headline = Text(f"sweep {self.name}: {self.headline(now)}", style="bold")
        return Group(headline, table) if running else Group(headline)


class SweepProgress(tune.Callback):
    """Tune callback on the driver: feeds the board from trial events and results, and shows it.

    On a terminal it draws the live table (Rich) at most every `draw_every` seconds and prints a line above it
    for each point that fails, naming its log file; elsewhere it prints the plain line every `plain_every`
    seconds and at each point's end.
    """

    def __init__(self, board: SweepBoard, storage: str | Path, console: Console | None = None,
                 plain_every: float = PLAIN_EVERY_SECONDS, draw_every: float = DRAW_EVERY_SECONDS, logs: bool = True):
        self.board, self.storage, self.logs = board, Path(storage), logs
        self.console = console  # made at start when not given: Tune pickles its callbacks, and a Console holds a lock
        self.plain_every, self.draw_every = plain_every, draw_every
        self.live: Live | None = None
        self.stopped = False
        self.last_plain = self.last_draw = float("-inf")
        self.last_counts: dict[str, int] = {}  # at the last plain line
        self.hashes: dict[str, str] = {}  # trial id -> run hash

    # --- showing ---
    def __getstate__(self) -> dict:
        return {**self.__dict__, "console": None, "live": None}

    def start(self) -> None:
        self.console = self.console or Console()
        if self.console.is_terminal and self.live is None:
            self.live = Live(self.board.table(time.monotonic()), console=self.console, auto_refresh=False,
                             vertical_overflow="visible")
            self.live.start()

    def stop(self) -> None:
        """The last picture: the table's final state, or a last plain line (once, however often it is called)."""
        if self.stopped:
            return
        self.stopped = True
        if self.live is not None:
            self.live.update(self.board.table(time.monotonic()), refresh=True)
            self.live.stop()
            self.live = None
        elif self.board.counts() != self.last_counts:
            print(self.board.plain_line(time.monotonic()), flush=True)

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.live is not None:
            if force or now - self.last_draw >= self.draw_every:
                self.live.update(self.board.table(now), refresh=True)
                self.last_draw = now
        elif force or now - self.last_plain >= self.plain_every:
            print(self.board.plain_line(now), flush=True)
            self.last_plain, self.last_counts = now, self.board.counts()

    def say(self, line: str) -> None:
        """A line above the table (or in the plain output)."""
        if self.live is not None:
            self.live.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def failed(self, point: PointState, reason: str) -> None:
        where = f"; its log: {point_log(self.storage, point.name)}" if self.logs else ""
        self.say(f"failed: {point.name} ({reason}){where}")

    # --- Tune's events ---
    def point(self, trial) -> PointState:
        """The trial's point; one the adaptive planner placed after the sweep started joins the board."""
        if trial.trial_id not in self.hashes:
            spec = RunSpec(**trial.config["spec"])
            self.hashes[trial.trial_id] = trial_key(trial.config)
            self.board.points.setdefault(self.hashes[trial.trial_id], PointState.of(spec))
        return self.board.points[self.hashes[trial.trial_id]]

    def setup(self, **info) -> None:
        self.start()

    def on_step_end(self, iteration, trials, **info) -> None:
        self.show()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.point(trial).state = RUNNING
        self.board.first_start = self.board.first_start or time.monotonic()
        if self.live is not None:  # a new row at once; the plain lines keep their pace
            self.show(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.point(trial).update(result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        point = self.point(trial)
        point.update({"status": (trial.last_result or {}).get("status") or Outcome.FINISHED})
        if point.state == FAILED:
            self.failed(point, point.note)
        self.show(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        point = self.point(trial)
        point.state, point.note = FAILED, Outcome.ERRORED
        self.failed(point, error_line(trial))
        self.show(force=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.say(f"retrying: {self.point(trial).name} crashed and restarts from its last checkpoint")

    def on_experiment_end(self, trials, **info) -> None:
        self.stop()


def trial_key(config: dict) -> str:
    """A trial's row on the board: its point's run hash, or a ladder's stable run's own hash (its spec is that of
    its longest branch, which has a row of its own)."""
    ladder = config.get("ladder") or {}
    return ladder["run_hash"] if ladder.get("role") == "stable" else RunSpec(**config["spec"]).run_hash


def error_line(trial) -> str:
    """'errored: <the exception's last line>' from the error file Tune wrote in the trial's local folder."""
    path = trial.error_file and Path(trial.error_file)
    text = path.read_text(errors="replace") if path and path.exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return Outcome.reason(Outcome.ERRORED, lines[-1][:300]) if lines else Outcome.ERRORED
