"""The training recipe (TrainConfig) and a run's full specification (RunSpec), whose hash is its identity.

Defaults are the SMDM recipe; tiny CPU runs override what they must (batch, context, lr, warmup).
Overrides come as dot-free `key=value` strings (`--set lr=1e-3`) parsed as YAML scalars.
Each recipe field says on itself what it is to a run's identity: by default part of it; SPEED_OR_BOOKKEEPING
for keys that change no result (collected in NOT_IDENTITY); `added(before)` for keys added after runs were
finished, which leave the hash alone while they hold the value those runs had (collected in ADDED_KEYS).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import BudgetError, ConfigError, DataError, did_you_mean
from pipeline.model.flops import BudgetPlan, FlopsConvention, plan_budget
from pipeline.model.shapes import Shape, resolve_shape
from pipeline.training import deepspeed_settings

Family = Literal["arm", "mdm"]

# A field's role in the run hash, declared on the field (see RunSpec.identity)
SPEED_OR_BOOKKEEPING = {"identity": False}


def added(before: Any) -> dict:
    """A key added after runs were finished, which behaved as `before`: that value stays out of the hash."""
    return {"identity": "added", "before": before}


class TrainConfig(BaseModel):
    """The training recipe shared by every grid point of a sweep."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(2048, gt=1, description="tokens per training sequence (context length); SMDM: 2048")
    batch_size: int = Field(256, gt=0, description="global batch in sequences; SMDM: 256")
    micro_batch_size: int | None = Field(None, gt=0, description="per-rank micro batch; default batch_size / world "
                                         "size (smaller ones accumulate gradients: the same run)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate; SMDM's code: 2e-4 (its paper's appendix says 4e-4)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the schedule's floor as a fraction of lr; SMDM: 0.1")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", json_schema_extra=added("cosine"),
        description="after warmup: cosine decay to the floor over the run (SMDM), or warmup-stable-decay: lr held, "
                    "then decayed to the floor over the last decay_fraction of the steps")
    decay_fraction: float = Field(0.2, gt=0, le=1, json_schema_extra=added(0.2),
                                  description="wsd: the share of the steps spent decaying")
    decay_shape: Literal["linear", "1-sqrt"] = Field(
        "linear", json_schema_extra=added("linear"),
        description="wsd: the decay's shape, lr falling linearly or as 1 - sqrt(progress) (Hagele et al. 2024)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1; SMDM: 0.9")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2; SMDM: 0.95")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay; SMDM: 0.1")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0: none); SMDM: 1.0")
    warmup_fraction: float = Field(0.01, ge=0, lt=1, description="linear warmup as a fraction of steps; SMDM: 1%")
    warmup_min_steps: int = Field(100, ge=0, description="warmup lasts at least this many steps; SMDM uses 100, "
                                                         "tiny CPU runs scale it down")
    min_steps: int = Field(20, ge=1, description="budgets giving fewer optimizer steps are refused")
    seed: int = Field(3407, description="weights, batch order and noise; SMDM: 3407 (a sweep sets it from `seeds:`)")
    init: Literal["smdm", "normal_0.02"] = Field(
        "smdm", json_schema_extra=added("normal_0.02"),
        description="initial weights: SMDM's size-aware rule, or N(0, 0.02) everywhere (runs before this key)")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also "
                                                       "gradients, 3 also weights")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 compute over fp32 master weights, or fp32; auto: bf16 on a GPU with zero_stage >= 1")
    flops_convention: FlopsConvention = Field("6ND", description="how a budget becomes tokens (pipeline/model/"
                                              "flops.py); SMDM: 6ND, non-embedding N")
    mdm_eps: float = Field(1e-3, gt=0, lt=1, description="the MDM's lowest mask probability: p = (1 - eps) t + eps; "
                                                         "SMDM: 1e-3")
    t_sampling: Literal["stratified", "iid"] = Field(
        "stratified", description="the MDM's diffusion times over a global batch: one shared offset, evenly spaced "
                                  "(lower variance), or independent draws (SMDM's code)")
    mdm_masking: Literal["time", "count"] = Field(
        "time", json_schema_extra=added("time"),
        description="how the MDM's training loss masks a sequence: each token with probability t (SMDM), or "
                    "exactly l tokens with weight L/l (the same bound, a lower-variance gradient)")
    eval_samples: int = Field(128, gt=0, description="Monte Carlo draws per sequence for the MDM bound; SMDM: 128")
    mdm_eval: Literal["time", "count"] = Field(
        "time", json_schema_extra=added("time"),
        description="how the MDM's validation bound is estimated: a mask probability from a time t per draw "
                    "(SMDM), or exactly l masked tokens per draw with l stratified over 1..L (LLaDA)")
    max_epochs: float = Field(1.0, gt=0, json_schema_extra=SPEED_OR_BOOKKEEPING,
                              description="passes over the training split a run may make; a point needing more is "
                                          "refused before it trains (SMDM: one epoch)")
    unique_tokens: int | None = Field(
        None, gt=0, json_schema_extra=added(None),
        description="train on the prefix of the training split holding this many tokens (its first unique_tokens // "
                    "(seq_len + 1) blocks), repeated as the budget needs: epochs = D / unique_tokens, so raise "
                    "max_epochs to allow it (Muennighoff et al. 2023); default: the whole split")
    val_blocks: int = Field(64, gt=0, description="held-out sequences in the validation set")
    eval_batch_size: int = Field(16, gt=0, description="sequences (or MDM draws) per validation forward pass")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed settings passed to the engine "
                                      "(pipeline/training/deepspeed_settings.py); only those that can change "
                                      "numbers are identity")
    compile: bool = Field(False, json_schema_extra=SPEED_OR_BOOKKEEPING,
                          description="torch.compile the model (through DeepSpeed's engine.compile): faster steps "
                                      "after a compile of tens of seconds; the same run")
    checkpoint_every: int = Field(500, ge=0, json_schema_extra=SPEED_OR_BOOKKEEPING,
                                  description="steps between checkpoints; 0 = only at the end")
    keep_checkpoint: bool = Field(False, json_schema_extra=SPEED_OR_BOOKKEEPING,
                                  description="keep the last DeepSpeed checkpoint (optimizer state included) in the "
                                              "run folder, to continue or anneal the run later")
    log_every: int = Field(10, gt=0, json_schema_extra=SPEED_OR_BOOKKEEPING,
                           description="steps per logged window of training metrics")

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed_settings(cls, block):
        return deepspeed_settings.validate(block)

    @model_validator(mode="after")
    def _decay_settings_need_wsd(self):
        changed = [f"{key}={getattr(self, key)}" for key in ("decay_fraction", "decay_shape")
                   if getattr(self, key) != type(self).model_fields[key].default]
        if self.schedule == "cosine" and changed:
            raise ValueError(f"{', '.join(changed)} shape the wsd schedule's decay; with schedule=cosine they would "
                             "change nothing (set schedule=wsd)")
        return self

    @model_validator(mode="after")
    def _bf16_keeps_fp32_master_weights(self):
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision=bf16 needs zero_stage >= 1: there DeepSpeed keeps fp32 master weights that the "
                             "final model can be taken from (got zero_stage=0)")
        return self

    @model_validator(mode="after")
    def _subset_holds_a_block(self):
        if self.unique_tokens is not None and self.unique_tokens < self.seq_len + 1:
            raise ValueError(f"unique_tokens={self.unique_tokens} holds no training block of seq_len+1="
                             f"{self.seq_len + 1} tokens")
        return self

    def unique_blocks(self) -> int | None:
        """Training blocks of the unique-data subset (None: the whole training split)."""
        return None if self.unique_tokens is None else self.unique_tokens // (self.seq_len + 1)

    def bf16_on(self, device_type: str) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda" and self.zero_stage >= 1)

    def warmup_steps(self, steps: int) -> int:
        return max(math.ceil(self.warmup_fraction * steps), self.warmup_min_steps)

    def decay_steps(self, steps: int) -> int:
        """wsd: the steps of the final decay (at least one); cosine decays from the end of warmup on."""
        return max(1, math.ceil(self.decay_fraction * steps)) if self.schedule == "wsd" else steps

    def decay_start(self, steps: int) -> int:
        """The first step whose lr is below the peak: after warmup, where the decay begins. A wsd run's lr before it
        does not depend on `steps` (for runs with equal warmups), which is what lets a ladder share it."""
        return max(self.warmup_steps(steps), steps - self.decay_steps(steps))

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


def _role(name: str) -> dict:
    return TrainConfig.model_fields[name].json_schema_extra or {}


NOT_IDENTITY = frozenset(name for name in TrainConfig.model_fields if _role(name).get("identity") is False)
# Recipe keys added after runs were finished: key -> the behaviour those runs had before the key existed.
ADDED_KEYS = {name: _role(name)["before"] for name in TrainConfig.model_fields if _role(name).get("identity") == "added"}


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
        from pipeline.model.family import FAMILIES  # torch: loaded only where runs are planned

        recipe = self.train
        plan = plan_budget(self.budget, self.shape, vocab_size=vocab_size, seq_len=recipe.seq_len,
                           batch_size=recipe.batch_size, convention=recipe.flops_convention, min_steps=recipe.min_steps,
                           head_share=FAMILIES[self.family].head_share(recipe))
        warmup = recipe.warmup_steps(plan.steps)
        if warmup >= plan.steps:
            raise BudgetError(f"budget: {self.budget:.3g} FLOPs gives {plan.steps} steps for model {self.shape.label}, "
                              f"which do not outlast the warmup of {warmup} (train.warmup_min_steps="
                              f"{recipe.warmup_min_steps}, train.warmup_fraction={recipe.warmup_fraction})")
        if train_blocks is None:
            return plan
        blocks, source = self._trained_blocks(train_blocks)
        epochs = plan.steps * recipe.batch_size / max(blocks, 1)
        if epochs > recipe.max_epochs:
            raise DataError(f"train.max_epochs: {self.family} {self.shape.label} at {self.budget:.3g} FLOPs trains on "
                            f"{plan.steps * recipe.batch_size:,} sequences, {epochs:.4g} epochs of {source}'s "
                            f"{blocks:,}, above train.max_epochs={recipe.max_epochs:g} (use a larger corpus, or "
                            "raise max_epochs to repeat data on purpose)")
        return replace(plan, epochs=epochs)

    def _trained_blocks(self, train_blocks: int) -> tuple[int, str]:
        """(the blocks this run draws its batches from, what they are): the corpus's training blocks, or the
        prefix train.unique_tokens asks for, which must fit in them."""
        recipe = self.train
        subset = recipe.unique_blocks()
        if subset is None:
            return train_blocks, "the corpus"
        width = recipe.seq_len + 1
        if subset > train_blocks:
            raise DataError(f"train.unique_tokens: {recipe.unique_tokens:,} tokens ({subset:,} blocks of seq_len+1="
                            f"{width}) is more than the corpus's training split holds: {train_blocks:,} blocks "
                            f"({train_blocks * width:,} tokens)")
        return subset, f"the unique_tokens={recipe.unique_tokens:,} subset"

    @property
    def run_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        return f"{self.family}-{self.shape.label}-{self.budget:.2e}-{self.run_hash}"
