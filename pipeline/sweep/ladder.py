"""Ladder sweeps (`ladder: true`): each (family, size, seed, recipe variant) trained once at constant lr, with a
cooldown branch per budget. (Not the shape ladder sizes are picked from: pipeline/sweep/grid.py `ladder`.)

A wsd run of S steps warms up over W steps, holds its peak lr, and decays from b = max(W, S - ceil(decay_fraction
* S)) (`TrainConfig.decay_start`). Batches, noise and lr are functions of the step alone, so up to step b the run
is the same whatever S is, among runs with the same warmup W. The grid points that differ only in their budget
(and in what shapes their decay alone) therefore share one stable run: it trains to the last of their steps b and
keeps a checkpoint at each. Each point's branch is that point's own run (same spec, same hash, its own MLflow
run) resumed from the stable run's checkpoint at its b instead of started from step 0, so it trains exactly what
a point-by-point wsd run of the point trains (docs/method.md, "Ladder sweeps").

A point alone in its group gains nothing from a stable run and trains as an ordinary point. Everything here is a
pure function of the grid (and, for `ladder_work`, of what is finished and which checkpoints exist).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import SweepError
from pipeline.recipe import RunSpec
from pipeline.sweep.grid import GridPoint

# Recipe keys that shape only a run's decay, after the steps a stable run shares: runs that differ in them alone
# share one stable run
DECAY_ONLY = ("decay_fraction", "decay_shape", "min_lr_ratio")
# Replaced in a stable run's identity by the warmup they give, which is what the shared steps depend on
WARMUP_KEYS = ("warmup_fraction", "warmup_min_steps")


@dataclass(frozen=True)
class Branch:
    """A grid point trained from its stable run's checkpoint at `step`, the first step of its decay."""
    point: GridPoint
    step: int

    @property
    def steps(self) -> int:
        return self.point.plan.steps - self.step

    @property
    def flops(self) -> float:
        return self.point.plan.flops * self.steps / self.point.plan.steps

    @property
    def flops_spent(self) -> float:
        return self.point.plan.flops_spent * self.steps / self.point.plan.steps


@dataclass(frozen=True)
class StableRun:
    """The steps before their decays that `branches` share: their longest's run (whose lr up to its own decay is
    the stable run's: warmup, then the peak), trained to the last branch step, keeping a checkpoint at each."""
    spec: RunSpec
    warmup: int
    branches: tuple[Branch, ...]  # by step

    @property
    def end(self) -> int:
        return self.branches[-1].step

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({b.step for b in self.branches}))

    @property
    def run_hash(self) -> str:
        blob = json.dumps(stable_identity(self.branches[-1].point), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        return f"stable-{self.spec.family}-{self.spec.shape.label}-{self.run_hash}"

    @property
    def longest(self) -> GridPoint:
        return self.branches[-1].point

    @property
    def flops(self) -> float:
        return self.longest.plan.flops * self.end / self.longest.plan.steps

    @property
    def flops_spent(self) -> float:
        return self.longest.plan.flops_spent * self.end / self.longest.plan.steps


@dataclass(frozen=True)
class Ladder:
    stable: list[StableRun]
    alone: list[GridPoint]  # points no other point shares a stable run with: trained as they are

    @property
    def branches(self) -> list[Branch]:
        return [b for s in self.stable for b in s.branches]

    @property
    def flops(self) -> float:
        return sum(s.flops + sum(b.flops for b in s.branches) for s in self.stable) + sum(p.plan.flops for p in self.alone)

    @property
    def flops_spent(self) -> float:
        return (sum(s.flops_spent + sum(b.flops_spent for b in s.branches) for s in self.stable)
                + sum(p.plan.flops_spent for p in self.alone))


def warmup_of(point: GridPoint) -> int:
    return point.spec.train.warmup_steps(point.plan.steps)


def branch_step(point: GridPoint) -> int:
    return point.spec.train.decay_start(point.plan.steps)


def stable_identity(point: GridPoint, warmup: bool = True) -> dict:
    """What the steps of `point` before its decay depend on: its run's identity without the budget and the decay
    settings, its warmup given in steps (without it, with `warmup=False`: what would share a stable run if the
    warmups agreed)."""
    identity = point.spec.identity()
    train = {k: v for k, v in identity["train"].items() if k not in DECAY_ONLY + WARMUP_KEYS}
    del identity["budget"]
    return {**identity, "train": train, "ladder": "stable", **({"warmup_steps": warmup_of(point)} if warmup else {})}


def plan_ladder(points: list[GridPoint]) -> Ladder:
    """The stable runs and branches of a grid: one stable run per group of points sharing `stable_identity`,
    a branch per point of a group of two or more, the others alone. Raises where a point has no stable phase."""
    groups: dict[str, list[GridPoint]] = {}
    for point in points:
        groups.setdefault(json.dumps(stable_identity(point), sort_keys=True), []).append(point)
    stable, alone = [], []
    for members in groups.values():
        if len(members) == 1:
            alone.append(members[0])
            continue
        branches = tuple(sorted((Branch(p, branch_step(p)) for p in members),
                                key=lambda b: (b.step, b.point.plan.steps, b.point.spec.run_hash)))
        if branches[0].step == 0:
            raise SweepError(f"ladder: {branches[0].point.spec.run_name} decays from its first step (no warmup, "
                             "train.decay_fraction=1): it has no stable phase to share")
        stable.append(StableRun(branches[-1].point.spec, warmup_of(branches[-1].point), branches))
    return Ladder(stable, alone)


def warmup_warnings(points: list[GridPoint]) -> list[str]:
    """One line per run that would share a stable run across its budgets but for warmups of different lengths:
    train.warmup_fraction scales the warmup with the steps, so each length gets its own stable run."""
    by_run: dict[str, list[GridPoint]] = {}
    for point in points:
        by_run.setdefault(json.dumps(stable_identity(point, warmup=False), sort_keys=True), []).append(point)
    lines = []
    for members in by_run.values():
        warmups = sorted({warmup_of(p) for p in members})
        if len(warmups) > 1:
            spec = members[0].spec
            lines.append(f"warning: ladder: {spec.family} {spec.shape.label} (seed {spec.train.seed}) warms up over "
                         f"{', '.join(map(str, warmups))} steps at its {len(members)} budgets, so it needs "
                         f"{len(warmups)} stable runs; a warmup fixed in steps (train.warmup_fraction: 0, "
                         "warmup_min_steps: W) lets one serve them all")
    return lines


@dataclass(frozen=True)
class LadderWork:
    """What a (re)run of a ladder sweep trains: stable runs with the branch steps each must still checkpoint,
    the unfinished branches, and the unfinished points that train alone."""
    stable: list[tuple[StableRun, tuple[int, ...]]]
    branches: list[tuple[StableRun, Branch]]
    alone: list[GridPoint]


def ladder_work(ladder: Ladder, todo: set[str], kept: Callable[[StableRun], set[int]],
                resumable: Callable[[GridPoint], bool]) -> LadderWork:
    """Given the run hashes still `todo`, each stable run's `kept` checkpoint steps and whether a point has a
    checkpoint of its own to resume from: the work left. A stable run trains only for the branches still to run
    that can start from neither; a branch killed midway resumes from its own checkpoint."""
    stable, branches = [], []
    for run in ladder.stable:
        have = kept(run)
        open_branches = [b for b in run.branches if b.point.spec.run_hash in todo]
        branches += [(run, b) for b in open_branches]
        needed = sorted({b.step for b in open_branches if b.step not in have and not resumable(b.point)})
        if needed:
            stable.append((run, tuple(needed)))
    return LadderWork(stable, branches, [p for p in ladder.alone if p.spec.run_hash in todo])


def start_step(needed: tuple[int, ...], kept: set[int], latest: int | None) -> int | None:
    """The checkpoint a stable run resumes from to produce the `needed` steps: the newest of its kept ones and its
    latest at or before the first needed step (None: from the start). A later checkpoint would skip that step."""
    candidates = [s for s in (*kept, *([latest] if latest is not None else [])) if s <= needed[0]]
    return max(candidates, default=None)


def finished_steps(run: StableRun, finished: set[str]) -> list[int]:
    """The branch steps of `run` whose branches have all finished: their checkpoints have served."""
    return [step for step in run.steps
            if all(b.point.spec.run_hash in finished for b in run.branches if b.step == step)]


def format_ladder(ladder: Ladder, points: list[GridPoint]) -> str:
    """The dry run's ladder: a line per stable run and the FLOPs against the same grid trained point by point."""
    lines = [f"{'stable run':<34}{'warmup':>8}  branch steps (budgets)"]
    for run in ladder.stable:
        budgets = ", ".join(f"{b.step} ({b.point.spec.budget:.3g})" for b in run.branches)
        lines.append(f"{run.run_name:<34}{run.warmup:>8}  {budgets}")
    by_point = sum(p.plan.flops for p in points)
    spent = sum(p.plan.flops_spent for p in points)
    lines.append(f"ladder: {len(ladder.stable)} stable runs, {len(ladder.branches)} branches and {len(ladder.alone)} "
                 f"points alone train {ladder.flops:.3g} FLOPs ({ladder.flops_spent:.3g} spent), "
                 f"{ladder.flops / by_point:.2f}x the {by_point:.3g} ({spent:.3g} spent) of the same grid point by point")
    return "\n".join(lines)
