"""The adaptive planner: an IsoFLOP grid placed from the runs already finished (sweep files with sizes.adapt).

`schedule` is a pure function of the sweep file and the settled runs (finished with a loss, or failed), so a
rerun after a kill re-derives the same decisions and trains nothing twice; a decision reads only the budgets
it waits for, never whatever else happens to have finished.

Per family, budgets run smallest first, each centred on the N* its family's settled budgets predict (none:
tokens_per_param; one: its N* scaled as C^0.5; more: the fitted N*(C) law). Once a budget's points have
settled, its parabola in ln N is fitted; an optimum at an edge of the sampled sizes, a vertex outside them or
a curve flat within its noise adds sizes beyond that edge, up to `sizes.extend` per budget or the end of the
ladder. A matched family ({match: mdm, count: k}) runs a pilot budget, then k budgets placed where its losses
reach the matched family's (docs/method.md, "Adaptive grids").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import BudgetError, DataError
from pipeline.model.shapes import Shape
from pipeline.sweep.grid import GridPoint, analysis_size, ladder, nearest_shapes, point_spec, sizes_around
from pipeline.sweep.schema import BudgetMatch, SweepConfig

EXPONENT_RANGE = (0.25, 0.75)  # a fitted N*(C) exponent outside this is noise between close budgets
PRIOR_LOSS_SLOPE = -0.05  # d ln L* / d ln C with one budget to go on: the demo's frontiers fall as C^-0.03..-0.05
SIZES_PER_EXTENSION = 2
NEAR_BUDGET = 1.5  # a placed budget this close to one the family already has would repeat it
PILOT_MOVES = 2  # a pilot whose optimum lies below the ladder moves up at most this often (span^2 in all)


@dataclass(frozen=True)
class Curve:
    """A settled budget as the planner sees it: its optimum, and whether that lies inside the sampled sizes."""
    budget: float
    n_opt: float
    loss: float
    interior: bool
    below_ladder: bool = False  # lowest at the smaller edge, with no smaller shape on the ladder


@dataclass
class Schedule:
    points: list[GridPoint] = field(default_factory=list)  # every point placed so far, settled or not
    dropped: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # in the order they were made
    waiting: list[str] = field(default_factory=list)    # what the budgets not placed yet wait for
    curves: dict[str, list[Curve]] = field(default_factory=dict)  # each family's settled budgets


def schedule(sweep: SweepConfig, vocab_size: int, results: dict[str, float | None], data_fingerprint: str = "",
             train_blocks: int | None = None) -> Schedule:
    """Every point the sweep has placed given `results` (run hash -> validation loss of a settled point, None
    for one that failed), with the decisions that placed them."""
    return Planner(sweep, vocab_size, results, data_fingerprint, train_blocks).plan()


class Planner:
    def __init__(self, sweep: SweepConfig, vocab_size: int, results: dict[str, float | None],
                 data_fingerprint: str, train_blocks: int | None):
        self.sweep, self.rule, self.results = sweep, sweep.sizes, results
        self.vocab_size, self.fingerprint, self.train_blocks = vocab_size, data_fingerprint, train_blocks
        self.ladder = ladder(self.rule)
        self.out = Schedule()
        self.done: dict[str, bool] = {}
        self.known: dict[str, GridPoint | None] = {}  # run hash -> point placed (None: dropped)
        self.sizes: dict[tuple[str, Shape], float] = {}
        self.below: dict[str, float] = {}  # family -> the largest budget its optimum was found below the ladder at

    def plan(self) -> Schedule:
        if self.sweep.flops_convention == "spent":
            self.say("N below is spent N (spent FLOPs per token / 6), the size the analysis fits a sweep budgeted "
                     "in spent FLOPs on")
        matched = {f: self.sweep.budgets_for(f) for f in self.sweep.families
                   if isinstance(self.sweep.budgets_for(f), BudgetMatch)}
        for family in self.sweep.families:  # listed budgets first: matched ones read their curves
            if family not in matched:
                self.chain(family, sorted(self.sweep.budgets_for(family)), [])
        for family, rule in matched.items():
            self.match(family, rule)
        return self.out

    # --- decisions ---
    def say(self, line: str) -> None:
        self.out.decisions.append(line)

    def chain(self, family: str, budgets: list[float], settled: list[Curve]) -> list[Curve] | None:
        """Run `budgets` smallest first, each centred from the budgets settled before it; the family's settled
        curves once all have settled, else None (the rest wait)."""
        for i, budget in enumerate(budgets):
            curve = self.curve(family, budget, *self.predict(family, budget, settled))
            settled = sorted([*settled, curve], key=lambda c: c.budget) if curve else settled
            self.out.curves[family] = settled
            if curve is None:
                self.out.waiting += [f"{family} {later:.3g}: waits for {family} {budget:.3g}" for later in budgets[i + 1:]]
                self.done[family] = False
                return None
        self.done[family] = True
        return settled

    def predict(self, family: str, budget: float, settled: list[Curve]) -> tuple[float, str]:
        """(centre N of the budget's window, why)."""
        if not settled:
            ratio = self.rule.ratio(family)
            return math.sqrt(budget / (6 * ratio)), f"first guess tokens_per_param = {ratio:g}"
        if len(settled) == 1:
            (one,) = settled
            return one.n_opt * math.sqrt(budget / one.budget), f"N* = {one.n_opt:.3g} at {one.budget:.3g}, scaled as C^0.5"
        coef, exponent = n_opt_law(settled)
        return coef * budget ** exponent, f"N*(C) = {coef:.3g} C^{exponent:.3f} from {len(settled)} budgets"

    def curve(self, family: str, budget: float, centre: float, why: str) -> Curve | None:
        """Place one budget's sizes around `centre` and extend them past an edge optimum; its Curve once every
        point has settled, None while some are pending."""
        runnable = self.runnable(family, budget)
        shapes = sizes_around(centre, self.rule, runnable, lambda s: self.size(family, s))
        self.say(f"{family} {budget:.3g}: sizes centred on N = {centre:.3g} ({why}): {labels(shapes)}")
        added = 0
        while True:
            losses = self.measure(family, budget, shapes)
            if losses is None:
                return None
            if not losses:
                self.say(f"{family} {budget:.3g}: no size finished, so nothing is centred from it")
                return None
            side, n_opt, loss, why = optimum(losses)
            where = f"{family} {budget:.3g}"
            if side is None:
                self.say(f"{where}: interior optimum N* = {n_opt:.3g}, loss {loss:.4f}")
                return Curve(budget, n_opt, loss, True)
            room = self.rule.extend - added
            beyond = self.beyond(family, shapes, side, min(room, SIZES_PER_EXTENSION), runnable)
            if room <= 0 or not beyond:
                ladder_end = room > 0 and not self.beyond(family, shapes, side, 1, self.ladder)
                if room <= 0:
                    limit = f"sizes.extend = {self.rule.extend} sizes already added"
                elif not ladder_end:
                    limit = (f"no {side} size can run at this budget: it would repeat data beyond train.max_epochs "
                             "or take fewer than train.min_steps steps")
                else:
                    limit = f"the ladder has no {side} shape; add some under sizes.shapes to go further"
                self.say(f"{where}: optimum left at the {side} edge ({why}); stopped: {limit}")
                return Curve(budget, n_opt, loss, False, below_ladder=ladder_end and side == "smaller")
            self.say(f"{where}: {why}; adding {labels(beyond)}")
            shapes, added = sorted([*shapes, *beyond], key=lambda s: self.size(family, s)), added + len(beyond)

    def size(self, family: str, shape: Shape) -> float:
        """The shape's N on the axis the analysis fits (spent N on a sweep budgeted in spent FLOPs), so that the
        planner's optima and edges are the analysis's."""
        if (family, shape) not in self.sizes:
            self.sizes[family, shape] = analysis_size(self.sweep, family, shape, self.vocab_size)
        return self.sizes[family, shape]

    def beyond(self, family: str, shapes: list[Shape], side: str, count: int, candidates: list[Shape]) -> list[Shape]:
        """`count` of the `candidates` past the `side` edge of `shapes`, at the window's spacing."""
        step = self.rule.span ** (1 / max(1, self.rule.per_budget - 1))
        sign = -1 if side == "smaller" else 1
        edge = self.size(family, shapes[0] if sign < 0 else shapes[-1])
        free = [s for s in candidates if sign * (self.size(family, s) - edge) > 0]
        return nearest_shapes([edge * step ** (sign * k) for k in range(1, count + 1)], free,
                              lambda s: self.size(family, s))

    def runnable(self, family: str, budget: float) -> list[Shape]:
        """The ladder's shapes that can run at `budget`: enough steps, no data repeated beyond max_epochs."""
        shapes = []
        for shape in self.ladder:
            try:
                point_spec(self.sweep, family, budget, shape, self.sweep.seeds[0], {}, self.fingerprint).plan(
                    self.vocab_size, self.train_blocks)
                shapes.append(shape)
            except (BudgetError, DataError):
                pass
        return shapes

    def measure(self, family: str, budget: float, shapes: list[Shape]) -> dict[float, float] | None:
        """Place the points of `shapes` at `budget` (every seed); N -> mean loss over the seeds that finished,
        or None while any point is pending."""
        losses, pending = {}, False
        for shape in shapes:
            seeds = []
            for seed in self.sweep.seeds:
                point = self.point(family, budget, shape, seed)
                if point is None:
                    continue
                if point.spec.run_hash not in self.results:
                    pending = True
                elif self.results[point.spec.run_hash] is not None:
                    seeds.append(self.results[point.spec.run_hash])
            if seeds:
                losses[self.size(family, shape)] = float(np.mean(seeds))
        return None if pending else losses

    def point(self, family: str, budget: float, shape: Shape, seed: int) -> GridPoint | None:
        """The grid point, placed on first sight; None for one that cannot run (the reason is in `dropped`)."""
        spec = point_spec(self.sweep, family, budget, shape, seed, {}, self.fingerprint)
        if spec.run_hash not in self.known:
            try:
                self.known[spec.run_hash] = GridPoint(spec, spec.plan(self.vocab_size, self.train_blocks))
                self.out.points.append(self.known[spec.run_hash])
            except (BudgetError, DataError) as err:
                self.known[spec.run_hash] = None
                self.out.dropped.append(f"{family} {shape.label} at {budget:.3g}: {err}")
                self.say(f"{family} {budget:.3g}: {shape.label} left out: {err}")
        return self.known[spec.run_hash]

    def match(self, family: str, rule: BudgetMatch) -> None:
        """A pilot budget at the matched family's smallest / prior_gap; once it and the matched family's first two
        budgets have settled, `count` budgets where this family's losses reach the matched family's; once
        everything has settled and the loss ranges still miss each other, `count` more, once."""
        target = rule.match
        target_budgets = sorted(self.sweep.budgets_for(target))
        pilot_budget = round_budget(target_budgets[0] / rule.prior_gap)
        self.say(f"{family}: pilot budget {pilot_budget:.3g} = {target}'s smallest {target_budgets[0]:.3g} / "
                 f"prior_gap {rule.prior_gap:g}")
        pilot_budget, pilot = self.pilot(family, pilot_budget)
        self.out.curves[family] = [pilot] if pilot else []
        need = min(2, len(target_budgets))
        first = self.out.curves.get(target, [])[:need]
        waits = ([f"its pilot {pilot_budget:.3g}"] if pilot is None else []) + \
                ([f"{target}'s first {need} budget(s)"] if len(first) < need else [])
        if waits:
            self.out.waiting.append(f"{family} matched budgets: wait for {' and '.join(waits)}")
            return
        settled = self.chain(family, self.place(family, rule, first, [pilot]), [pilot])
        if settled is None or not self.done.get(target):
            if settled is not None:
                self.out.waiting.append(f"{family} overlap check: waits for every {target} budget")
            return
        targets = self.out.curves[target]
        ours, theirs = loss_range(settled), loss_range(targets)
        low, high = max(ours[0], theirs[0]), min(ours[1], theirs[1])
        if low <= high:
            self.say(f"{family}: optimum losses {ours[0]:.4f}-{ours[1]:.4f} overlap {target}'s "
                     f"{theirs[0]:.4f}-{theirs[1]:.4f} at {low:.4f}-{high:.4f}")
            return
        self.say(f"{family}: optimum losses {ours[0]:.4f}-{ours[1]:.4f} miss {target}'s {theirs[0]:.4f}-{theirs[1]:.4f}; "
                 "placing its budgets once more from every settled budget")
        budgets = self.place(family, rule, targets, settled)
        if not budgets and ours[1] < theirs[0]:  # ours cannot go lower: only a larger budget of theirs meets them
            compute, _ = reach(targets, ours[1])
            self.say(f"{family}: the overlap stays empty: {target} would reach {family}'s highest optimum loss "
                     f"{ours[1]:.4f} near {compute:.2g} FLOPs; another {target} budget above that, or shapes smaller "
                     f"than {self.ladder[0].label} under sizes.shapes, would measure the gap at a loss both reach")
        self.chain(family, budgets, settled)

    def pilot(self, family: str, budget: float) -> tuple[float, Curve | None]:
        """The pilot's budget and curve, moved up while its optimum lies below the ladder's smallest shape: no loss
        measured there can place the matched budgets. Each move multiplies the budget by `span`, so an optimum
        growing as C^0.5 rises by sqrt(span), and centres the window at sqrt(span) x the smallest shape, its lower
        half on the ladder. The edge pilot's runs stay in the study; the analysis leaves an edge budget out of
        its fits."""
        centre, moves = self.predict(family, budget, []), 0
        while True:
            curve = self.curve(family, budget, *centre)
            if curve is None or not curve.below_ladder or moves == PILOT_MOVES:
                return budget, curve
            above, bottom = round_budget(budget * self.rule.span), self.ladder[0]
            self.say(f"{family}: pilot {budget:.3g} ends below the ladder's smallest shape; moved up "
                     f"{above / budget:.3g}x to {above:.3g}")
            self.below[family] = budget
            centre = (self.size(family, bottom) * math.sqrt(self.rule.span),
                      f"the ladder's smallest shape {bottom.label} at the window's lower end")
            budget, moves = above, moves + 1

    def place(self, family: str, rule: BudgetMatch, targets: list[Curve], ours: list[Curve]) -> list[float]:
        """`count` budgets over the matched family's budget range divided by the compute ratio measured at the
        loss of our curve nearest theirs; raised as a whole where the smallest would centre below the ladder."""
        reference = min(ours, key=lambda c: min(abs(math.log(c.loss / t.loss)) for t in targets))
        their_compute, slope = reach(targets, reference.loss)
        gap = their_compute / reference.budget
        span = sorted(self.sweep.budgets_for(rule.match))
        budgets = list(np.geomspace(span[0] / gap, span[-1] / gap, rule.count))
        self.say(f"{family}: {rule.match} reaches loss {reference.loss:.4f} at {their_compute:.3g} (slope "
                 f"{slope:.3f}), {gap:.3g}x {family}'s {reference.budget:.3g}")
        floor = self.smallest_centred(family, ours)
        why = f"the window would centre under the ladder's smallest shape {self.ladder[0].label}"
        if self.below.get(family, 0) * NEAR_BUDGET > floor:  # measured, where the prediction assumed C^0.5
            floor = self.below[family] * NEAR_BUDGET
            why = f"{family}'s optimum at {self.below[family]:.3g} lay below the ladder's smallest shape"
        if budgets[0] < floor:
            self.say(f"{family}: budgets raised {floor / budgets[0]:.3g}x: below {floor:.3g} {why}")
            budgets = [b * floor / budgets[0] for b in budgets]
        kept = []
        for budget in map(round_budget, budgets):
            if any(abs(math.log(budget / c.budget)) < math.log(NEAR_BUDGET) for c in ours) or budget in kept:
                self.say(f"{family}: {budget:.3g} left out, {family} has a budget within {NEAR_BUDGET}x of it")
            else:
                kept.append(budget)
        self.say(f"{family}: budgets {', '.join(f'{b:.3g}' for b in kept)}" if kept else f"{family}: no new budget")
        return kept

    def smallest_centred(self, family: str, settled: list[Curve]) -> float:
        """The budget whose predicted N* puts the window's lower half on the ladder."""
        n_floor = self.size(family, self.ladder[0]) * math.sqrt(self.rule.span)
        if len(settled) == 1:
            return settled[0].budget * (n_floor / settled[0].n_opt) ** 2
        coef, exponent = n_opt_law(settled)
        return (n_floor / coef) ** (1 / exponent)


def optimum(losses: dict[float, float]) -> tuple[str | None, float, float, str]:
    """(edge side or None, N*, loss at N*, what was found) for one budget's sizes N -> loss.

    Interior means: the lowest measured point is not an end, the parabola in ln N opens upwards with its
    vertex at least half a grid step inside the sizes (as the analysis requires), and both ends rise above
    the vertex by more than the fit's residual scatter.
    An edge's N* is the lowest measured size.
    """
    ns = sorted(losses)
    x, y = np.log(ns), np.array([losses[n] for n in ns])
    low = int(np.argmin(y))
    lowest = (ns[low], float(y[low]))
    if low in (0, len(ns) - 1):
        side = "smaller" if low == 0 else "larger"
        return side, *lowest, f"lowest loss at the {side} end"
    q2, q1, q0 = np.polyfit(x, y, 2)
    if q2 <= 0:
        side = "smaller" if y[0] < y[-1] else "larger"
        return side, *lowest, "flat or concave curve"
    vertex = -q1 / (2 * q2)
    half_step = (x[-1] - x[0]) / (len(x) - 1) / 2  # the analysis's edge rule (docs/method.md §6)
    if not x[0] + half_step <= vertex <= x[-1] - half_step:
        side = "smaller" if vertex < x[0] + half_step else "larger"
        return side, *lowest, f"vertex within half a grid step of the {side} end, or beyond it"
    fit = np.polyval((q2, q1, q0), x)
    scatter = math.sqrt(float(np.sum((y - fit) ** 2)) / (len(x) - 3)) if len(x) > 3 else 0.0
    at_vertex = float(np.polyval((q2, q1, q0), vertex))
    rises = {"smaller": fit[0] - at_vertex, "larger": fit[-1] - at_vertex}
    flat = min(rises, key=rises.get)
    if rises[flat] <= scatter:
        return flat, *lowest, f"curve flat within its noise ({scatter:.3g}) at the {flat} end"
    return None, float(math.exp(vertex)), at_vertex, "interior"


def n_opt_law(curves: list[Curve]) -> tuple[float, float]:
    """(coef, exponent) of N* = coef C^exponent through the curves, exponent held to EXPONENT_RANGE."""
    x, y = np.log([c.budget for c in curves]), np.log([c.n_opt for c in curves])
    exponent = float(np.clip(np.polyfit(x, y, 1)[0], *EXPONENT_RANGE))
    return float(math.exp(np.mean(y) - exponent * np.mean(x))), exponent


def reach(curves: list[Curve], loss: float) -> tuple[float, float]:
    """(the budget at which a family's optima reach `loss`, d ln L* / d ln C used): along its fitted L*(C) slope
    (the prior with one budget, or where the fit does not fall) from its budget of nearest loss."""
    near = min(curves, key=lambda c: abs(math.log(loss / c.loss)))
    slope = PRIOR_LOSS_SLOPE
    if len(curves) >= 2:
        fitted = np.polyfit([math.log(c.budget) for c in curves], [math.log(c.loss) for c in curves], 1)[0]
        slope = fitted if fitted < 0 else PRIOR_LOSS_SLOPE
    return near.budget * math.exp(math.log(loss / near.loss) / slope), slope


def loss_range(curves: list[Curve]) -> tuple[float, float]:
    return min(c.loss for c in curves), max(c.loss for c in curves)


def round_budget(budget: float) -> float:
    """Two significant digits: budgets people can read in run names and type back."""
    return float(f"{budget:.2g}")


def labels(shapes: list[Shape]) -> str:
    return ", ".join(s.label for s in shapes)
