"""FLOP conventions and the budget -> tokens -> steps arithmetic every grid point goes through."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import BudgetError
from pipeline.model.shapes import Shape

FlopsConvention = Literal["6ND", "palm", "spent"]
CONVENTIONS: tuple[str, ...] = ("6ND", "palm", "spent")


def matmul_params(shape: Shape, vocab_size: int) -> int:
    """Parameters that take part in a matrix multiply per token: the blocks' weights plus the LM head."""
    d = shape.d_model
    return shape.n_layer * (4 * d * d + 3 * d * shape.d_ff) + d * vocab_size


def flops_per_token(shape: Shape, vocab_size: int, seq_len: int, convention: FlopsConvention = "6ND",
                    head_share: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token.

    6ND: the paper's convention, 6 x non-embedding N (no attention, embedding or head term).
    palm: 6 x matmul params (LM head included) + 12 * n_layer * d_model * seq_len for attention scores.
    spent: palm with the head counted on the `head_share` of positions the family's loss scores.
    """
    if convention == "6ND":
        return 6.0 * shape.non_embedding_params()
    if convention in ("palm", "spent"):
        return spent_flops_per_token(shape, vocab_size, seq_len, head_share if convention == "spent" else 1.0)
    raise BudgetError(f"flops_convention: unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")


def spent_flops_per_token(shape: Shape, vocab_size: int, seq_len: int, head_share: float = 1.0) -> float:
    """What a training token costs as it runs: 6 FLOPs (2 forward, 4 backward) per weight of every matmul, the
    LM head's on the `head_share` of positions the loss scores (an MDM scores its masked ones alone), plus
    attention's QK^T and AV over the full context (12 * n_layer * d_model * seq_len: no causal discount)."""
    blocks = matmul_params(shape, 0)
    return 6.0 * (blocks + head_share * shape.d_model * vocab_size) + 12.0 * shape.n_layer * shape.d_model * seq_len


@dataclass(frozen=True)
class BudgetPlan:
    budget: float          # the FLOPs asked for
    flops_per_token: float
    tokens_per_step: int
    steps: int
    epochs: float | None = None   # passes over the training split, where the corpus is known
    spent_per_token: float = 0.0  # training FLOPs a token costs as it runs (spent_flops_per_token)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """The budget rounded to whole steps, in the budget's convention."""
        return self.tokens * self.flops_per_token

    @property
    def flops_spent(self) -> float:
        """The FLOPs the run spends, which a convention like 6ND undercounts (most for small models)."""
        return self.tokens * self.spent_per_token


def plan_budget(budget: float, shape: Shape, *, vocab_size: int, seq_len: int, batch_size: int,
                convention: FlopsConvention = "6ND", min_steps: int = 1, head_share: float = 1.0) -> BudgetPlan:
    """Tokens D = C / flops_per_token, trained in whole steps of batch_size x seq_len tokens."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise BudgetError(f"budget: must be a positive number of FLOPs, got {budget!r}")
    per_token = flops_per_token(shape, vocab_size, seq_len, convention, head_share)
    tokens_per_step = batch_size * seq_len
    steps = round(budget / (per_token * tokens_per_step))
    if steps < min_steps:
        raise BudgetError(
            f"budget: {budget:.3g} FLOPs gives {steps} steps for model {shape.label} "
            f"(N={shape.non_embedding_params():,}, {tokens_per_step:,} tokens/step), below train.min_steps={min_steps}")
    return BudgetPlan(budget, per_token, tokens_per_step, steps,
                      spent_per_token=spent_flops_per_token(shape, vocab_size, seq_len, head_share))


def budget_for_steps(shape: Shape, steps: int, *, batch_size: int, seq_len: int, vocab_size: int = 0,
                     convention: FlopsConvention = "6ND", head_share: float = 1.0) -> float:
    """The budget that trains exactly `steps` steps: plan_budget's inverse (vocab_size counts for palm and spent,
    head_share for spent)."""
    return flops_per_token(shape, vocab_size, seq_len, convention, head_share) * batch_size * seq_len * steps
