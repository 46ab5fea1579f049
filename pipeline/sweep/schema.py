"""The sweep file's schema: the IsoFLOP grid, the recipe and its searched keys, the resources, the data and
where results go. Loaded and expanded into run specs by `pipeline.sweep.grid`; pydantic reports every
problem at once, each naming its field."""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SweepError, did_you_mean
from pipeline.mlflow_keys import DEFAULT_TRACKING_URI
from pipeline.model.flops import FlopsConvention
from pipeline.model.shapes import resolve_shape
from pipeline.recipe import NOT_IDENTITY, Family, TrainConfig
from pipeline.training import deepspeed_settings


class Resources(BaseModel):
    """What one trial asks of the Ray cluster."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    workers_per_trial: int = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0, description="default: as many as the cluster holds")
    max_failures: int = Field(2, ge=0, description="restarts per trial, each from the last checkpoint")
    worker_group: bool = Field(False, description="run one-worker points in a Ray Train worker group too "
                                                  "(else they train in the Tune trial itself, seconds faster to start)")


class SizeRule(BaseModel):
    """Pick sizes per budget around a predicted optimum instead of listing models; with `adapt`, the planner
    (pipeline/sweep/adaptive.py) re-centres each budget on the optimum the finished budgets predict."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_budget: int = Field(5, ge=1)
    span: float = Field(8.0, gt=1, description="largest / smallest N per budget")
    tokens_per_param: float | dict[Family, float] = Field(
        20.0, description="predicted optimum D/N, centre of the window; a mapping gives each family its own "
                          "(an MDM's optimum sits at smaller N than an ARM's); with `adapt`, only the first budget's")
    adapt: bool = Field(False, description="plan the grid from finished runs: centre each budget on the predicted "
                                           "N*, add sizes beyond an edge optimum, place matched budgets")
    extend: int = Field(6, ge=0, description="with `adapt`: sizes a budget may add beyond its first window")
    ladder: Literal["cpu", "cpu16"] = Field("cpu", description="the registry ladder sizes are picked from below "
                                            "5M (the paper's shapes above): `cpu16` keeps heads 16-20 wide (one head below width 32)")
    shapes: list[str | dict] = Field(default_factory=list, description="shapes added to the ladder sizes are "
                                     "picked from (registry names or inline {n_layer, n_head, d_model, d_ff})")

    @field_validator("tokens_per_param")
    @classmethod
    def _positive_ratio(cls, value):
        ratios = value.values() if isinstance(value, dict) else [value]
        if any(r <= 0 for r in ratios):
            raise ValueError(f"tokens_per_param must be positive, got {value}")
        return value

    @field_validator("shapes")
    @classmethod
    def _known_shapes(cls, shapes):
        return _check_shapes(shapes)

    def ratio(self, family: str) -> float:
        return self.tokens_per_param[family] if isinstance(self.tokens_per_param, dict) else self.tokens_per_param


class BudgetMatch(BaseModel):
    """A family's budgets placed by the planner so that its losses reach another family's measured ones: a
    pilot budget first, then `count` budgets (docs/method.md, "Adaptive grids")."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: Family
    count: int = Field(3, ge=1)
    prior_gap: float = Field(16.0, gt=0, description="compute ratio assumed for the pilot: it runs at the matched "
                                                     "family's smallest budget / prior_gap")


class SyntheticData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(2_000_000, gt=0)
    seed: int = 0


class DataSpec(BaseModel):
    """A prepared data folder, or the built-in corpus generated there on first use."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    synthetic: SyntheticData | None = None
    vocab_size: int | None = Field(None, gt=0, description="expected vocabulary; lets --dry-run plan before the data exists")


# Recipe keys a sweep may not search, and why.
UNSEARCHABLE = {"seed": "each run's seed comes from the sweep's `seeds:` list",
                "unique_tokens": "the sweep's `unique_tokens:` list runs every grid point on each subset",
                "flops_convention": "the sweep's `flops_convention:` sets it for every run",
                "deepspeed": "give DeepSpeed settings in the sweep file's top-level `deepspeed:` block",
                **{key: "it does not change a run's result, so every variant would be the same run"
                   for key in NOT_IDENTITY}}
DISTRIBUTIONS = ("loguniform", "uniform")
SPACE_FORMS = "a list of values, {loguniform: [lo, hi], samples: k} or {uniform: [lo, hi], samples: k}"


def is_searched(value: Any) -> bool:
    """A sweep file's `train:` value that asks for a search: no recipe key takes a list or a mapping."""
    return isinstance(value, (list, dict))


def recipe_value(key: str, value: Any) -> Any:
    """`value` as recipe key `key` holds it ('1e-3' -> 0.001); ValueError naming the value if the key refuses it."""
    try:
        return getattr(TrainConfig(**{key: value}), key)
    except ValidationError as err:
        raise ValueError(f"{err.errors()[0]['msg']} (got {value!r})") from None


class SearchSpace(BaseModel):
    """One searched recipe key of a sweep file's `train:` section: the listed values, every one run (Ray Tune's
    grid_search), or `samples` draws from a loguniform or uniform distribution over [lo, hi]."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    grid_search: list[Any] | None = Field(None, description="what a YAML list becomes")
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    samples: int | None = Field(None, ge=1, description="how many values to draw from the distribution")

    @model_validator(mode="before")
    @classmethod
    def _searchable_key(cls, raw: dict) -> dict:
        key = raw["key"]
        if key not in TrainConfig.model_fields:
            raise ValueError(f"unknown key{did_you_mean(key, TrainConfig.model_fields)}")
        if key in UNSEARCHABLE:
            raise ValueError(f"cannot be searched: {UNSEARCHABLE[key]}")
        unknown = [k for k in raw if k not in cls.model_fields]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], (*DISTRIBUTIONS, 'samples'))}; "
                             f"give {SPACE_FORMS}")
        if isinstance(raw.get("grid_search"), list):  # typed as the recipe holds them, so duplicates show
            raw = {**raw, "grid_search": [recipe_value(key, v) for v in raw["grid_search"]]}
        return raw

    @model_validator(mode="after")
    def _one_well_formed_space(self):
        forms = [f for f in ("grid_search", *DISTRIBUTIONS) if getattr(self, f) is not None]
        if len(forms) != 1:
            raise ValueError(f"give {SPACE_FORMS}")
        if self.grid_search is not None:
            if not self.grid_search:
                raise ValueError("the list of values is empty")
            repeated = [v for i, v in enumerate(self.grid_search) if v in self.grid_search[:i]]
            if repeated:
                raise ValueError(f"{repeated[0]!r} is listed twice")
            if self.samples is not None:
                raise ValueError(f"samples goes with loguniform or uniform, not a list (got samples={self.samples})")
            return self
        kind, (lo, hi) = forms[0], self.bounds
        if self.samples is None:
            raise ValueError(f"{kind} needs samples: k, how many values to draw")
        if TrainConfig.model_fields[self.key].annotation is not float:
            raise ValueError(f"{kind} draws real numbers, but {self.key} is not one; give a list of values")
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ValueError(f"{kind} needs {'0 < ' if kind == 'loguniform' else ''}lo < hi (got [{lo:g}, {hi:g}])")
        for bound in (lo, hi):  # the recipe's constraints are intervals: valid bounds make every draw valid
            recipe_value(self.key, bound)
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        return self.loguniform or self.uniform

    def values(self, seed: int) -> list:
        """The values this key takes: the listed ones, or `samples` distinct draws, the same for the same seed."""
        if self.grid_search is not None:
            return list(self.grid_search)
        import numpy as np
        from ray import tune  # seconds to import: only sweeps that sample pay for it
        from ray.tune.search.variant_generator import generate_variants

        lo, hi = self.bounds
        domain = tune.loguniform(lo, hi) if self.loguniform else tune.uniform(lo, hi)
        # One stream per key, so adding a searched key keeps the other keys' draws (hence finished runs), and
        # raising `samples` keeps the first draws.
        rng = np.random.RandomState([seed, zlib.crc32(self.key.encode())])
        drawn: list[float] = []
        for _ in range(100 * self.samples):  # a collision is redrawn
            _, resolved = next(generate_variants({self.key: domain}, random_state=rng))
            # 4 significant digits: the label is the exact value, and a last-bit difference in another machine's
            # exp/log cannot change the value, hence the run hash
            value = min(max(float(f"{resolved[self.key]:.4g}"), lo), hi)
            if value not in drawn:
                drawn.append(value)
            if len(drawn) == self.samples:
                return drawn
        raise SweepError(f"train.{self.key}: [{lo:g}, {hi:g}] holds fewer than {self.samples} distinct values at 4 "
                         "significant digits; widen it or take fewer samples")


def variant_label(train: TrainConfig, keys: Iterable[str]) -> str:
    """What a run tried of the searched `keys`, e.g. `lr=0.003538,warmup_fraction=0.05` (each value as Python
    prints it: exact, and short for the values users write and draws rounded to 4 digits); "" when none."""
    return ",".join(f"{key}={getattr(train, key)}" for key in sorted(keys))


def _check_shapes(shapes: list[str | dict]) -> list[str | dict]:
    errors = []
    for m in shapes:
        try:
            resolve_shape(m)
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("; ".join(errors))
    return shapes


class SweepConfig(BaseModel):
    """A sweep file: the IsoFLOP grid, the recipe, the resources and where results go."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the MLflow experiment")
    data: DataSpec
    families: list[Family] = Field(min_length=1)
    budgets: list[float] | dict[str, list[float] | BudgetMatch] = Field(
        description="FLOP budgets for every family, or a mapping {arm: [...], mdm: [...]} giving each its own "
                    "(an MDM grid can then sit where its losses reach the ARM's); with sizes.adapt, a family's "
                    "entry may be {match: <family>, count: k}: budgets placed from the other family's losses")
    flops_convention: FlopsConvention = "6ND"
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed settings for every run's engine "
                                      "(pipeline/training/deepspeed_settings.py)")
    models: list[str | dict] | None = None
    sizes: SizeRule | None = None
    seeds: list[int] = [0]
    unique_tokens: list[int] | None = Field(None, min_length=1, description="unique-data sizes: each grid point "
                                            "trains on each, repeated as needed (train.unique_tokens)")
    train: TrainConfig = TrainConfig()
    # The lists and mappings of the same `train:` section, so that their errors name train.<key>
    search: dict[str, SearchSpace] = Field(default_factory=dict, validation_alias="train",
                                           description="searched recipe keys: every grid point runs once per variant")
    search_seed: int = Field(0, description="seeds the draws of sampled keys: a re-run draws the same values")
    ladder: bool = Field(False, description="a stable run per size, a wsd cooldown per budget (pipeline/sweep/ladder.py)")
    resources: Resources = Resources()
    tracking_uri: str = DEFAULT_TRACKING_URI
    storage: str = Field("ray_results", description="a folder every node can reach (local disk on one machine, "
                                                   "a shared filesystem on a cluster): checkpoints, models, Tune state")

    @field_validator("train", mode="before")
    @classmethod
    def _fixed_recipe(cls, value):
        return {k: v for k, v in value.items() if not is_searched(v)} if isinstance(value, dict) else value

    @field_validator("search", mode="before")
    @classmethod
    def _searched_recipe(cls, value):
        if not isinstance(value, dict):  # not a mapping: `train` says so
            return {}
        return {key: {**space, "key": key} if isinstance(space, dict) else {"key": key, "grid_search": space}
                for key, space in value.items() if is_searched(space)}

    def variants(self) -> list[dict]:
        """The recipe overrides every grid point runs with, one dict per variant: Ray Tune's grid search over
        the searched keys' values (the cross product, in Tune's order); [{}] when nothing is searched."""
        if not self.search:
            return [{}]
        from ray import tune
        from ray.tune.search.variant_generator import generate_variants

        spec = {key: tune.grid_search(space.values(self.search_seed)) for key, space in self.search.items()}
        return [variant for _, variant in generate_variants(spec)]

    @field_validator("data", mode="before")
    @classmethod
    def _data_path(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @field_validator("storage")
    @classmethod
    def _filesystem_storage(cls, storage):
        if "://" in storage:  # DeepSpeed writes its checkpoint shards as files
            raise ValueError(f"storage must be a filesystem path (shared by all nodes on a cluster), got {storage!r}")
        return storage

    @field_validator("budgets")
    @classmethod
    def _positive_budgets(cls, budgets):
        for key, values in (budgets.items() if isinstance(budgets, dict) else [("", budgets)]):
            where = f"budgets.{key}" if key else "budgets"
            if isinstance(values, BudgetMatch):
                continue
            if not values:
                raise ValueError(f"{where} is empty: give at least one FLOP budget")
            bad = [b for b in values if not (math.isfinite(b) and b > 0)]
            if bad:
                raise ValueError(f"{where} must be positive finite FLOP counts, got {bad}")
        return budgets

    @model_validator(mode="after")
    def _budgets_per_family(self):
        if isinstance(self.budgets, dict):
            unknown = [k for k in self.budgets if k not in self.families]
            if unknown:
                raise ValueError(f"budgets: {unknown[0]!r} is not one of the sweep's families "
                                 f"{self.families}{did_you_mean(unknown[0], self.families)}")
            missing = [f for f in self.families if f not in self.budgets]
            if missing:
                raise ValueError(f"budgets: no budgets for family {missing[0]!r}; the mapping has "
                                 f"{sorted(self.budgets)}")
        return self

    @model_validator(mode="after")
    def _seed_and_convention_set_once(self):
        """The sweep's `seeds:` and `flops_convention:` set every run's; the same keys under `train:` would be
        overridden, so a file that gives both levels different values is refused rather than read one way."""
        given = self.train.model_fields_set
        if "seed" in given and self.seeds != [self.train.seed]:
            raise ValueError(f"train.seed: {self.train.seed} and seeds: {self.seeds} both set the runs' seed and "
                             f"disagree; give it once, as seeds: [{self.train.seed}]")
        if "flops_convention" in given and self.train.flops_convention != self.flops_convention:
            raise ValueError(f"train.flops_convention: {self.train.flops_convention} and flops_convention: "
                             f"{self.flops_convention} disagree; give it once, as flops_convention: "
                             f"{self.train.flops_convention}")
        return self

    @model_validator(mode="after")
    def _unique_data(self):
        """Distinct sizes of at least one training block, set here or as train.unique_tokens, not both."""
        sizes, width = self.unique_tokens or [], self.train.seq_len + 1
        wrong = [u for u in sizes if u < width] or [u for i, u in enumerate(sizes) if u in sizes[:i]]
        if wrong:
            why = "is listed twice" if wrong[0] >= width else f"holds no training block of seq_len+1={width} tokens"
            raise ValueError(f"unique_tokens: {wrong[0]} {why}")
        if self.unique_tokens is not None and self.train.unique_tokens is not None:
            raise ValueError(f"train.unique_tokens: {self.train.unique_tokens} and unique_tokens: {sizes} both set "
                             "the runs' unique data; give it once")
        return self

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed_settings(cls, block):
        return deepspeed_settings.validate(block)

    def budgets_for(self, family: str) -> list[float] | BudgetMatch:
        return self.budgets[family] if isinstance(self.budgets, dict) else self.budgets

    @property
    def adaptive(self) -> bool:
        return bool(self.sizes and self.sizes.adapt)

    @model_validator(mode="after")
    def _planner_settings(self):
        """What the planner needs: a size rule that adapts for matched budgets, a matched family that has its own
        budgets, and one curve per budget (searched recipe keys would make several)."""
        matched = {f: b for f, b in self.budgets.items() if isinstance(b, BudgetMatch)} \
            if isinstance(self.budgets, dict) else {}
        for family, rule in matched.items():
            if not self.adaptive:
                raise ValueError(f"budgets.{family}: {{match: {rule.match}}} places budgets from measured losses; "
                                 "it needs sizes: {adapt: true}")
            target = self.budgets.get(rule.match)
            if rule.match == family or not isinstance(target, list):
                raise ValueError(f"budgets.{family}.match: {rule.match!r} must be another family of the sweep with "
                                 "a list of budgets")
        if self.adaptive and self.search:
            raise ValueError(f"sizes.adapt: plans one IsoFLOP curve per budget, but train searches "
                             f"{sorted(self.search)}, which makes one per variant; search the recipe in a fixed grid")
        if self.adaptive and self.unique_tokens:
            raise ValueError(f"sizes.adapt: plans one IsoFLOP curve per budget, but unique_tokens: "
                             f"{self.unique_tokens} makes one per unique-data size; list the models or sizes in a "
                             "fixed grid")
        return self

    @model_validator(mode="after")
    def _ladder_settings(self):
        """A ladder needs wsd for every run, a stable phase to share and a fixed grid (pipeline/sweep/ladder.py)."""
        schedule = self.search["schedule"].grid_search if "schedule" in self.search else self.train.schedule
        refusals = [(schedule != "wsd", "branches cooldowns off a run held at constant lr, which needs "
                     f"train.schedule: wsd for every run (got {schedule}); set schedule: wsd under train:"),
                    (self.train.decay_fraction == 1, "shares the steps before each decay: train.decay_fraction=1 has none"),
                    (self.adaptive, "plans stable runs from the whole grid, but sizes.adapt places points as runs "
                     "finish: the two do not combine yet (list the models or use a fixed size rule)")]
        for refused, why in refusals if self.ladder else ():
            if refused:
                raise ValueError(f"ladder: true {why}")
        return self

    @field_validator("models")
    @classmethod
    def _known_models(cls, models):
        _check_shapes(models or [])
        return models

    @model_validator(mode="after")
    def _models_or_sizes(self):
        if (self.models is None) == (self.sizes is None):
            raise ValueError("give exactly one of `models` (a list of shapes) or `sizes` (a rule)")
        return self
