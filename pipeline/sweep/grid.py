"""Sweep file -> IsoFLOP grid of RunSpecs, with the points that cannot run dropped and explained."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
from itertools import product
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.errors import BudgetError, DataError, SweepError
from pipeline.model.family import FAMILIES
from pipeline.model.flops import BudgetPlan, spent_flops_per_token
from pipeline.model.shapes import LADDERS, PAPER_SHAPES, Shape, resolve_shape
from pipeline.recipe import RunSpec, format_validation_error
from pipeline.sweep.schema import SizeRule, SweepConfig, variant_label


@dataclass(frozen=True)
class GridPoint:
    spec: RunSpec
    plan: BudgetPlan
    variant: str = ""  # the searched recipe values it runs with (variant_label); "" when the sweep searches none


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file: {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file: {path} must hold a mapping of settings, got {type(raw).__name__}")
    try:
        return SweepConfig(**raw)
    except ValidationError as err:
        raise SweepError(f"{path}:\n" + format_validation_error(err, schema=SweepConfig)) from None


def ladder(rule: SizeRule) -> list[Shape]:
    """The shapes a size rule picks from, smallest first: its registry ladder's and its own `shapes`."""
    shapes = {*LADDERS[rule.ladder].values(), *PAPER_SHAPES.values(), *map(resolve_shape, rule.shapes)}
    return sorted(shapes, key=Shape.non_embedding_params)


def sizes_around(centre: float, rule: SizeRule, shapes: list[Shape] | None = None,
                 size: Callable[[Shape], float] = Shape.non_embedding_params) -> list[Shape]:
    """`per_budget` shapes of `shapes` (default: the rule's ladder) log-spaced over `span` around N = `centre`,
    smallest first, N being `size` of a shape.

    Each target takes the nearest shape not yet taken, so a coarse stretch of the ladder still yields
    `per_budget` distinct sizes.
    """
    targets = [centre * rule.span ** (i / max(1, rule.per_budget - 1) - 0.5) for i in range(rule.per_budget)]
    return nearest_shapes(targets, ladder(rule) if shapes is None else shapes, size)


def nearest_shapes(targets: list[float], shapes: list[Shape],
                   size: Callable[[Shape], float] = Shape.non_embedding_params) -> list[Shape]:
    """For each target N in turn, the shape of `shapes` nearest in log N not yet taken; smallest first."""
    chosen: list[Shape] = []
    for target in targets:
        free = [s for s in shapes if s not in chosen]
        if free:
            chosen.append(min(free, key=lambda s: abs(math.log(size(s) / target))))
    return sorted(chosen, key=size)


def sizes_for_budget(budget: float, family: str, sweep: SweepConfig) -> list[Shape]:
    """The sizes around N* = sqrt(C / (6 * tokens_per_param))."""
    return sizes_around(math.sqrt(budget / (6 * sweep.sizes.ratio(family))), sweep.sizes)


def expand_grid(sweep: SweepConfig, vocab_size: int, data_fingerprint: str = "",
                train_blocks: int | None = None) -> tuple[list[GridPoint], list[str]]:
    """(points to run, reasons for points dropped). Every (family, budget, size, seed, unique-data size) runs once
    per recipe variant of the sweep's searched keys. A budget too small for its model drops the point; duplicate
    points, and points that would repeat data beyond train.max_epochs (given the corpus's `train_blocks`) or ask
    for more unique data than it holds, are errors, all listed at once."""
    points, dropped, refused, seen = [], [], [], {}
    variants = sweep.variants()
    for family in sweep.families:
        for budget in sweep.budgets_for(family):
            shapes = sizes_for_budget(budget, family, sweep) if sweep.sizes else [resolve_shape(m) for m in sweep.models]
            for shape in shapes:
                for seed, unique, variant in product(sweep.seeds, sweep.unique_tokens or [None], variants):
                    spec = point_spec(sweep, family, budget, shape, seed, variant, data_fingerprint, unique)
                    label = variant_label(spec.train, sweep.search)
                    of_variant = f" ({label})" if label else ""
                    of_unique = f", unique_tokens={unique}" if unique else ""
                    if spec.run_hash in seen:
                        raise SweepError(f"duplicated grid point: {spec.run_name} (family={family}, budget={budget:g}, "
                                         f"model={shape.label}, seed={seed}{of_unique}){of_variant} appears twice")
                    seen[spec.run_hash] = spec
                    try:
                        points.append(GridPoint(spec, spec.plan(vocab_size, train_blocks), label))
                    except BudgetError as err:
                        dropped.append(f"{family} {shape.label} at {budget:.3g}{of_unique}{of_variant}: {err}")
                    except DataError as err:
                        refused.append(f"{err}{of_variant}")
    if refused:
        raise SweepError("\n".join(dict.fromkeys(refused)))  # a subset the corpus cannot hold: said once
    return points, dropped


def point_spec(sweep: SweepConfig, family: str, budget: float, shape: Shape, seed: int, variant: dict,
               data_fingerprint: str, unique_tokens: int | None = None) -> RunSpec:
    """The run of one grid point: the sweep's recipe with its convention, DeepSpeed block, seed, variant and, from
    the sweep's `unique_tokens:` list, its unique-data size."""
    subset = {} if unique_tokens is None else {"unique_tokens": unique_tokens}
    train = sweep.train.with_overrides({"flops_convention": sweep.flops_convention, "deepspeed": sweep.deepspeed,
                                        "seed": seed, **subset, **variant})
    return RunSpec(family=family, shape=shape, budget=budget, data_fingerprint=data_fingerprint, train=train)


def analysis_size(sweep: SweepConfig, family: str, shape: Shape, vocab_size: int) -> float:
    """A shape's N on the axis `isoflop analyze` fits this sweep on by default (analysis/runs.py): spent FLOPs per
    token / 6 for a sweep budgeted in spent FLOPs, else its non-embedding N."""
    if sweep.flops_convention != "spent":
        return shape.non_embedding_params()
    recipe = point_spec(sweep, family, 1.0, shape, sweep.seeds[0], {}, "").train
    return spent_flops_per_token(shape, vocab_size, recipe.seq_len, FAMILIES[family].head_share(recipe)) / 6


def validation_share(point: GridPoint) -> float:
    """The final validation's FLOPs as a fraction of the run's training FLOPs: forward passes (a third of a
    training step's FLOPs per token) over val_blocks sequences, once per Monte Carlo draw for an MDM."""
    recipe, plan = point.spec.train, point.plan
    passes = FAMILIES[point.spec.family].validation_passes(recipe)
    return recipe.val_blocks * recipe.seq_len * passes * plan.flops_per_token / 3 / plan.flops


def format_grid(points: list[GridPoint]) -> str:
    """The --dry-run table; a `variant` column, and the number of variants, when the sweep searches the recipe."""
    variants = sorted({p.variant for p in points if p.variant})
    subsets = any(p.spec.train.unique_tokens for p in points)
    header = (f"{'family':<7}{'budget':>10}  {'model':<14}{'N':>15}{'D (tokens)':>18}{'steps':>9}{'D/N':>8}"
              + (f"{'U (tokens)':>14}" if subsets else "") + f"{'epochs':>8}{'eval/C':>8}{'spent/C':>9}")
    header += "  variant" if variants else ""
    lines = [header, "-" * len(header)]
    for p in points:
        s = p.spec
        n = s.shape.non_embedding_params()
        epochs = "?" if p.plan.epochs is None else f"{p.plan.epochs:.3f}"  # unknown until the data exists
        unique = "" if not subsets else f"{s.train.unique_tokens:>14,}" if s.train.unique_tokens else f"{'all':>14}"
        lines.append(f"{s.family:<7}{s.budget:>10.3g}  {s.shape.label:<14}{n:>15,}{p.plan.tokens:>18,}"
                     f"{p.plan.steps:>9}{p.plan.tokens / n:>8.1f}{unique}{epochs:>8}{validation_share(p):>8.2%}"
                     f"{p.plan.flops_spent / p.plan.flops:>9.2f}"
                     + (f"  {p.variant}" if variants else ""))
    if variants:
        lines.append(f"{len(variants)} recipe variants: every grid point runs once with each")
    return "\n".join(lines)


def spent_warnings(points: list[GridPoint], tolerance: float = 1.2) -> list[str]:
    """One line per family and budget whose sizes spend unequal compute: a convention that leaves out the LM
    head and attention (6ND) undercounts small models most, so their curve is not iso in what is spent."""
    groups: dict[tuple[str, float], list[GridPoint]] = {}
    for p in points:
        groups.setdefault((p.spec.family, p.spec.budget), []).append(p)
    lines = []
    for (family, budget), members in groups.items():
        ratios = {p.spec.shape.label: p.plan.flops_spent / p.plan.flops for p in members}
        low, high = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
        if ratios[high] > tolerance * ratios[low]:
            lines.append(f"warning: {family} at {budget:.3g} is not iso in spent compute: spent/C runs from "
                         f"{ratios[low]:.2f} ({low}) to {ratios[high]:.2f} ({high}) under flops_convention="
                         f"{members[0].spec.train.flops_convention}; flops_convention: spent counts what each size "
                         "spends")
    return lines
