"""Conditional likelihood of a continuation, and a multiple-choice evaluator on top (docs/method.md §7).

An ARM's likelihood is exact (the chain rule); an MDM's is its Monte Carlo upper bound with only the
continuation noised. The family object computes it; this module checks input and reads task files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import SamplingError
from pipeline.model.family import family_of
from pipeline.model.noise import MonteCarlo
from pipeline.model.sampling import check_fits, check_ids
from pipeline.model.transformer import Transformer


@torch.inference_mode()
def continuation_nll(model: Transformer, context: list[int], continuation: list[int],
                     mc: MonteCarlo = MonteCarlo()) -> float:
    """−log p(continuation | context) in nats (an MDM: the estimate of its upper bound, seeded by mc)."""
    device = next(model.parameters()).device
    context_ids = torch.tensor(context, dtype=torch.long, device=device)
    target = torch.tensor(continuation, dtype=torch.long, device=device)
    if len(target) == 0:
        raise SamplingError("continuation is empty")
    check_fits(model, len(context_ids), len(target), "context", "continuation length")
    check_ids(model, context_ids, "context")
    check_ids(model, target, "continuation")
    return family_of(model).continuation_nll(model, context_ids, target, mc)


@dataclass(frozen=True)
class ChoiceTask:
    context: str
    choices: tuple[str, ...]
    answer: int               # index into choices


@dataclass
class ChoiceResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[int]


def read_tasks(path: str | Path) -> list[ChoiceTask]:
    """A JSONL file, one {"context": str, "choices": [str, ...], "answer": index} per line."""
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"tasks: {path}: no such file")
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"tasks: {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SamplingError(f"{where}: not JSON") from None
        if not isinstance(row, dict):
            raise SamplingError(f"{where}: expected an object with context, choices, answer")
        context, choices, answer = row.get("context"), row.get("choices"), row.get("answer")
        if not isinstance(context, str):
            raise SamplingError(f"{where}: 'context' must be a string, got {context!r}")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise SamplingError(f"{where}: 'choices' must be a list of two or more non-empty strings, got {choices!r}")
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            raise SamplingError(f"{where}: 'answer' must be an index 0..{len(choices) - 1}, got {answer!r}")
        tasks.append(ChoiceTask(context, tuple(choices), answer))
    if not tasks:
        raise SamplingError(f"tasks: {path}: no tasks")
    return tasks


def evaluate_choices(model: Transformer, tokenizer: Tokenizer, tasks: list[ChoiceTask],
                     mc: MonteCarlo = MonteCarlo()) -> ChoiceResult:
    """Pick the choice with the highest conditional likelihood (lowest NLL) given the context."""
    predictions = []
    for number, task in enumerate(tasks, 1):
        context = tokenizer.encode_prompt(task.context)
        try:
            nll = [continuation_nll(model, context, tokenizer.encode(choice), mc) for choice in task.choices]
        except SamplingError as err:
            raise SamplingError(f"tasks: task {number}: {err}") from None
        predictions.append(min(range(len(nll)), key=nll.__getitem__))
    correct = sum(p == t.answer for p, t in zip(predictions, tasks))
    return ChoiceResult(correct / len(tasks), correct, len(tasks), predictions)
