"""Typed configs: the training recipe and a run's full specification (whose hash is its identity).

Defaults are the SMDM recipe; tiny CPU runs override what they must (batch, context, lr, warmup).
Overrides come as dot-free `key=value` strings (`--set lr=1e-3`) parsed as YAML scalars.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import deepspeed_settings
from pipeline.errors import BudgetError, ConfigError, DataError, SweepError, did_you_mean
from pipeline.flops import BudgetPlan, FlopsConvention, plan_budget
from pipeline.mlflow_keys import DEFAULT_TRACKING_URI
from pipeline.shapes import Shape, resolve_shape

Family = Literal["arm", "mdm"]


class TrainConfig(BaseModel):
    """The training recipe shared by every grid point of a sweep."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(2048, gt=1)
    batch_size: int = Field(256, gt=0, description="global batch in sequences")
    micro_batch_size: int | None = Field(None, gt=0, description="per-rank micro batch; default batch_size / world size")
    # The SMDM code uses 2e-4; its paper's appendix says 4e-4.
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    warmup_fraction: float = Field(0.01, ge=0, lt=1)
    warmup_min_steps: int = Field(100, ge=0, description="SMDM uses 100; tiny CPU runs scale it down")
    min_steps: int = Field(20, ge=1, description="budgets giving fewer steps are refused")
    seed: int = 3407
    init: Literal["smdm", "normal_0.02"] = Field(
        "smdm", description="initial weights: SMDM's size-aware rule, or N(0, 0.02) everywhere (runs before this key)")
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 compute over fp32 master weights, or fp32; auto: bf16 on a GPU with zero_stage >= 1")
    flops_convention: FlopsConvention = "6ND"
    mdm_eps: float = Field(1e-3, gt=0, lt=1)
    t_sampling: Literal["stratified", "iid"] = "stratified"
    mdm_masking: Literal["time", "count"] = Field(
        "time", description="how the MDM's training loss masks a sequence: each token with probability t (SMDM), or "
                            "exactly l tokens with weight L/l (the same bound, a lower-variance gradient)")
    eval_samples: int = Field(128, gt=0, description="Monte Carlo draws per sequence for the MDM bound")
    mdm_eval: Literal["time", "count"] = Field(
        "time", description="how the MDM's validation bound is estimated: a mask probability from a time t per draw "
                            "(SMDM), or exactly l masked tokens per draw with l stratified over 1..L (LLaDA)")
    max_epochs: float = Field(1.0, gt=0, description="passes over the training split a run may make; a point "
                                                     "needing more is refused before it trains")
    val_blocks: int = Field(64, gt=0, description="held-out sequences in the validation set")
    eval_batch_size: int = Field(16, gt=0)
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed settings passed to the engine "
                                      "(pipeline/deepspeed_settings.py); only those that can change numbers are identity")
    compile: bool = Field(False, description="torch.compile the model (through DeepSpeed's engine.compile): "
                                              "faster steps after a compile of tens of seconds; the same run")
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_checkpoint: bool = Field(False, description="keep the last DeepSpeed checkpoint (optimizer state included) "
                                                     "in the run folder, to continue or anneal the run later")
    log_every: int = Field(10, gt=0)

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed_settings(cls, block):
        return deepspeed_settings.validate(block)

    @model_validator(mode="after")
    def _bf16_keeps_fp32_master_weights(self):
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision=bf16 needs zero_stage >= 1: there DeepSpeed keeps fp32 master weights that the "
                             "final model can be taken from (got zero_stage=0)")
        return self

    def bf16_on(self, device_type: str) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda" and self.zero_stage >= 1)

    def warmup_steps(self, steps: int) -> int:
        return max(math.ceil(self.warmup_fraction * steps), self.warmup_min_steps)

    def with_overrides(self, overrides: dict) -> "TrainConfig":
        return TrainConfig(**{**self.model_dump(), **overrides})


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings to a dict, values read as YAML scalars (1e-3 -> float, true -> bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value, got {pair!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads 1e-3 as a string; numbers users write should stay numbers
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def format_validation_error(err: ValidationError, prefix: str = "", schema: type[BaseModel] | None = None) -> str:
    """One line per problem, each naming the field and the value given (and a near miss for unknown keys)."""
    lines = []
    for e in _union_branch_errors(err.errors()):
        where = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(e["loc"][-1]), _known_keys(schema, e["loc"][:-1])) if schema else ""
            lines.append(f"{where}: unknown key{hint}")
            continue
        given = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}{given}")
    return "\n".join(lines)


def _union_branch_errors(errors: list[dict]) -> list[dict]:
    """Errors of a union field (`list | dict`) come once per branch, each under a loc part naming the branch
    (`list[float]`): keep those of the branch the input was meant for, without that part."""
    def is_tag(part) -> bool:
        return isinstance(part, str) and "[" in part

    def field_of(e) -> tuple:
        return next((e["loc"][:i] for i, part in enumerate(e["loc"]) if is_tag(part)), e["loc"])

    wrong_shape = [e for e in errors if e["type"] in ("list_type", "dict_type") and e["loc"] and is_tag(e["loc"][-1])]
    kept = [e for e in errors if e not in wrong_shape
            or not any(field_of(o) == field_of(e) for o in errors if o not in wrong_shape)]
    return [{**e, "loc": tuple(p for p in e["loc"] if not is_tag(p))} for e in kept]


def _known_keys(schema: type[BaseModel], path: tuple) -> list[str]:
    """Field names of the (nested) model at `path`, for did-you-mean hints."""
    for key in path:
        field = schema.model_fields.get(str(key))
        inner = getattr(field, "annotation", None) if field else None
        candidates = [inner, *getattr(inner, "__args__", ())]
        schema = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if schema is None:
            return []
    return list(schema.model_fields)


NOT_IDENTITY = {"log_every", "checkpoint_every", "max_epochs", "compile", "keep_checkpoint"}
# Recipe keys added after runs were finished: key -> the behaviour those runs had before the key existed.
ADDED_KEYS = {"mdm_eval": "time", "init": "normal_0.02", "mdm_masking": "time"}


class RunSpec(BaseModel):
    """Everything that determines a training run's result; its hash names the run everywhere."""
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    family: Family
    shape: Shape
    budget: float = Field(gt=0)
    train: TrainConfig = TrainConfig()
    data_fingerprint: str = ""

    @field_validator("shape", mode="before")
    @classmethod
    def _resolve_shape(cls, value):
        return resolve_shape(value)

    @model_validator(mode="after")
    def _finite_budget(self):
        if not math.isfinite(self.budget):
            raise ValueError(f"budget must be finite, got {self.budget}")
        return self

    def identity(self) -> dict:
        """The resolved config that defines the run. Left out: what changes no result (logging cadence, the
        epoch guard), and recipe keys added after runs were finished while they keep the behaviour those
        runs had, so that finished runs keep their hashes."""
        train = {key: value for key, value in self.train.model_dump(exclude=NOT_IDENTITY).items()
                 if key not in ADDED_KEYS or ADDED_KEYS[key] != value}
        train["deepspeed"] = deepspeed_settings.numeric_part(train["deepspeed"])
        if not train["deepspeed"]:  # speed settings alone leave a run what it was
            del train["deepspeed"]
        return {"family": self.family, "shape": self.shape.as_dict(), "budget": self.budget,
                "train": train, "data_fingerprint": self.data_fingerprint}

    def to_dict(self) -> dict:
        """A JSON-safe form that RunSpec(**d) reads back (Ray passes specs between processes as config)."""
        shape = {**self.shape.as_dict(), **({"name": self.shape.name} if self.shape.name else {})}
        return {"family": self.family, "shape": shape, "budget": self.budget, "train": self.train.model_dump(),
                "data_fingerprint": self.data_fingerprint}

    def plan(self, vocab_size: int, train_blocks: int | None = None) -> BudgetPlan:
        """Tokens, steps and (given the corpus's training blocks) epochs of this run; BudgetError when its
        budget cannot be trained as asked, DataError when it would repeat data beyond train.max_epochs."""
        cfg = self.train
        plan = plan_budget(self.budget, self.shape, vocab_size=vocab_size, seq_len=cfg.seq_len,
                           batch_size=cfg.batch_size, convention=cfg.flops_convention, min_steps=cfg.min_steps)
        warmup = cfg.warmup_steps(plan.steps)
        if warmup >= plan.steps:
            raise BudgetError(f"budget: {self.budget:.3g} FLOPs gives {plan.steps} steps for model {self.shape.label}, "
                              f"which do not outlast the warmup of {warmup} (train.warmup_min_steps="
                              f"{cfg.warmup_min_steps}, train.warmup_fraction={cfg.warmup_fraction})")
        if train_blocks is None:
            return plan
        epochs = plan.steps * cfg.batch_size / max(train_blocks, 1)
        if epochs > cfg.max_epochs:
            raise DataError(f"train.max_epochs: {self.family} {self.shape.label} at {self.budget:.3g} FLOPs trains on "
                            f"{plan.steps * cfg.batch_size:,} sequences, {epochs:.4g} epochs of the corpus's "
                            f"{train_blocks:,}, above train.max_epochs={cfg.max_epochs:g} (use a larger corpus, or "
                            "raise max_epochs to repeat data on purpose)")
        return replace(plan, epochs=epochs)

    @property
    def run_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        return f"{self.family}-{self.shape.label}-{self.budget:.2e}-{self.run_hash}"


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
    """Pick sizes per budget around a predicted optimum instead of listing models."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_budget: int = Field(5, ge=1)
    span: float = Field(8.0, gt=1, description="largest / smallest N per budget")
    tokens_per_param: float | dict[Family, float] = Field(
        20.0, description="predicted optimum D/N, centre of the window; a mapping gives each family its own "
                          "(an MDM's optimum sits at smaller N than an ARM's)")

    @field_validator("tokens_per_param")
    @classmethod
    def _positive_ratio(cls, value):
        ratios = value.values() if isinstance(value, dict) else [value]
        if any(r <= 0 for r in ratios):
            raise ValueError(f"tokens_per_param must be positive, got {value}")
        return value

    def ratio(self, family: str) -> float:
        return self.tokens_per_param[family] if isinstance(self.tokens_per_param, dict) else self.tokens_per_param


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


class SweepConfig(BaseModel):
    """A sweep file: the IsoFLOP grid, the recipe, the resources and where results go."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the MLflow experiment")
    data: DataSpec
    families: list[Family] = Field(min_length=1)
    budgets: list[float] | dict[str, list[float]] = Field(
        description="FLOP budgets for every family, or a mapping {arm: [...], mdm: [...]} giving each its own "
                    "(an MDM grid can then sit where its losses reach the ARM's)")
    flops_convention: FlopsConvention = "6ND"
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed settings for every run's engine "
                                      "(pipeline/deepspeed_settings.py)")
    models: list[str | dict] | None = None
    sizes: SizeRule | None = None
    seeds: list[int] = [0]
    train: TrainConfig = TrainConfig()
    # The lists and mappings of the same `train:` section, so that their errors name train.<key>
    search: dict[str, SearchSpace] = Field(default_factory=dict, validation_alias="train",
                                           description="searched recipe keys: every grid point runs once per variant")
    search_seed: int = Field(0, description="seeds the draws of sampled keys: a re-run draws the same values")
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

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed_settings(cls, block):
        return deepspeed_settings.validate(block)

    def budgets_for(self, family: str) -> list[float]:
        return self.budgets[family] if isinstance(self.budgets, dict) else self.budgets

    @field_validator("models")
    @classmethod
    def _known_models(cls, models):
        errors = []
        for m in models or []:
            try:
                resolve_shape(m)
            except ValueError as err:
                errors.append(str(err))
        if errors:
            raise ValueError("; ".join(errors))
        return models

    @model_validator(mode="after")
    def _models_or_sizes(self):
        if (self.models is None) == (self.sizes is None):
            raise ValueError("give exactly one of `models` (a list of shapes) or `sizes` (a rule)")
        return self
