"""Downstream evaluation with EleutherAI's lm-evaluation-harness (`isoflop eval`).

`IsoflopLM` is an lm_eval model over a trained model and its tokenizer. Its likelihoods are the family's
own (pipeline/use/scoring.py): exact for an ARM, the Monte Carlo bound for an MDM (K seeded draws with only the
continuation masked, optionally with classifier-free guidance), so a task's accuracy rests on the same
numbers as `isoflop score`. Generation uses the family's sampler. Every context starts with EOS, as every
training document does, and is cut from the left where it and the continuation overflow the model context.

Tasks are lm-eval's: the YAML files of `pipeline/use/lm_eval_tasks/` (synthetic-corpus tasks that need no hub),
of any `--include-path` folder, and lm-eval's own catalogue (which downloads its data sets from the hub).
Results go to the run's MLflow run as metrics `eval/<task>/<metric>`, where the runs table picks them up.
This module imports lm_eval, which is slow to import: the command line loads it only for `isoflop eval`.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import ConfigError, SamplingError, did_you_mean
from pipeline.mlflow_keys import EVAL_PREFIX
from pipeline.model.noise import MonteCarlo
from pipeline.model.transformer import Transformer
from pipeline.use.scoring import continuation_nll

SHIPPED_TASKS = Path(__file__).with_name("lm_eval_tasks")
BOOTSTRAP_ITERS = 1000  # lm-eval bootstraps the error of a few metrics (perplexity, f1, ...); its default is 100k
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's, for a generation task that sets none


@dataclass(frozen=True)
class EvalSettings:
    tasks: tuple[str, ...]
    include_paths: tuple[str, ...] = ()
    mc: MonteCarlo = field(default_factory=MonteCarlo)  # an MDM's likelihood bound: samples K, guidance, seed
    sampling: dict = field(default_factory=dict)  # the family's sampler options for generation (steps, sampler, guidance)
    limit: int | None = None              # documents per task (None: all)
    num_fewshot: int | None = None        # None: the task's own setting


class IsoflopLM(LM):
    """lm-eval's three request types on one of our models.

    `greedy_tasks`: the tasks whose metrics read a loglikelihood request's is_greedy (output type
    `loglikelihood`, e.g. LAMBADA's accuracy). Only for those is the greedy check run: it decodes the
    continuation with the family's sampler at temperature 0 and compares, which for an MDM costs a network
    call per token. Elsewhere is_greedy is reported False.
    """

    def __init__(self, model: Transformer, family, tokenizer: Tokenizer, mc: MonteCarlo,
                 sampling: dict | None = None, greedy_tasks: frozenset[str] = frozenset()):
        super().__init__()
        self.model, self.family, self.tokenizer, self.mc = model, family, tokenizer, mc
        self.sampling = dict(sampling or {})
        self.greedy_tasks = greedy_tasks
        self.context = model.config.seq_len
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------ lm-eval's API

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = self._encode_pair(*request.args)
            context = self._fit(context, len(continuation), request)
            logp = -continuation_nll(self.model, context, continuation, self.mc)
            greedy = request.task_name in self.greedy_tasks and self._is_greedy(context, continuation)
            results.append((logp, greedy))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """A document's log-likelihood in windows of the model context, each predicting new tokens given
        what precedes them in the window (lm-eval's rolling scheme; the first window conditions on EOS)."""
        results = []
        for request in requests:
            tokens = self.tokenizer.encode(request.args[0])
            windows = get_rolling_token_windows(tokens, self.tokenizer.eos_id, self.context - 1, context_len=1)
            results.append(-sum(continuation_nll(self.model, *make_disjoint_window(w), self.mc) for w in windows))
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for request in requests:
            text, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            length = min(int(options.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.context - 1)
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            prompt = self._fit(self.tokenizer.encode_prompt(text), length, request)
            answer = self._generate(prompt, length, temperature)
            results.append(_cut(self._decode(answer), until))
        return results

    # ------------------------------------------------------------------------------------ pieces

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """EOS + context, and the continuation, encoded apart so the continuation's tokens are its own.
        Spaces at the end of the context belong to the continuation (lm-eval's convention)."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        return self.tokenizer.encode_prompt(stripped), self.tokenizer.encode(continuation)

    def _fit(self, context: list[int], continuation: int, request) -> list[int]:
        """The context's last tokens, as many as fit beside the continuation (at least one)."""
        room = self.context - continuation
        if room < 1:
            raise SamplingError(f"{request.task_name}: document {request.doc_id}: a continuation of {continuation} "
                                f"tokens does not fit the model context of {self.context}")
        return context[-room:]

    def _generate(self, prompt: list[int], length: int, temperature: float) -> list[int]:
        ids = torch.tensor([prompt], dtype=torch.long, device=self._device)
        sample = self.family.sample(self.model, ids, length=length, temperature=temperature, seed=self.mc.seed,
                                    **self.sampling)
        return sample.answer[0].tolist()

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        return self._generate(context, len(continuation), 0.0) == continuation

    def _decode(self, answer: list[int]) -> str:
        """The generated text up to the first EOS (the end of a document). Token-id text gets the space that
        separates it from the prompt, as the continuation of a text would carry its own."""
        if self.tokenizer.eos_id in answer:
            answer = answer[:answer.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(answer)
        return " " + text if self.tokenizer.kind == "ids" and text else text


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop sequence."""
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


# ------------------------------------------------------------------------------------------- tasks

def task_manager(tasks: tuple[str, ...], include_paths: tuple[str, ...] = ()):
    """An lm-eval TaskManager that knows every task asked for, or a one-line ConfigError naming one it does not.

    Indexing lm-eval's own catalogue takes seconds, so the shipped and included folders are tried alone first.
    """
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("--tasks: give one or more task names, e.g. synthetic_choice")
    for path in include_paths:
        if not Path(path).is_dir():
            raise ConfigError(f"--include-path: {path}: no such folder")
    paths = [str(SHIPPED_TASKS), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    for name in tasks:
        if name not in manager.all_tasks:
            raise ConfigError(f"--tasks: unknown task {name!r}{did_you_mean(name, manager.all_tasks)} (shipped: "
                              f"{', '.join(sorted(p.stem for p in SHIPPED_TASKS.glob('*.yaml')))}; "
                              "more with --include-path DIR of task YAML files)")
    return manager


def evaluate(model: Transformer, family, tokenizer: Tokenizer, settings: EvalSettings, manager=None) -> dict:
    """lm-eval's results dict (results, n-samples, samples per document, ...) for the settings' tasks."""
    from lm_eval.evaluator import simple_evaluate

    manager = manager or task_manager(settings.tasks, settings.include_paths)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes are noise on a terminal
    loaded = manager.load(list(settings.tasks))["tasks"]
    greedy = frozenset(name for name, task in loaded.items() if task.get_config("output_type") == "loglikelihood")
    lm = IsoflopLM(model, family, tokenizer, settings.mc, settings.sampling, greedy)
    with torch.inference_mode():
        return simple_evaluate(lm, tasks=list(settings.tasks), task_manager=manager, limit=settings.limit,
                               num_fewshot=settings.num_fewshot, bootstrap_iters=BOOTSTRAP_ITERS,
                               random_seed=settings.mc.seed, numpy_random_seed=settings.mc.seed,
                               torch_random_seed=settings.mc.seed, fewshot_random_seed=settings.mc.seed)


def metrics_of(results: dict) -> dict[str, float]:
    """{'eval/<task>/<metric>': value} from lm-eval's results: 'acc,none' -> eval/<task>/acc,
    'acc_stderr,none' -> eval/<task>/acc_stderr, 'exact_match,strip' -> eval/<task>/exact_match/strip.
    Non-numbers (an error lm-eval could not compute, 'N/A') are left out."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or name == "alias":
                continue
            suffix = name if filter_name in ("", "none") else f"{name}/{filter_name}"
            metrics[_mlflow_key(f"{EVAL_PREFIX}{task}/{suffix}")] = float(value)
    return metrics


def _mlflow_key(name: str) -> str:
    """MLflow metric names take letters, digits, '_', '-', '.', ' ', ':' and '/'."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def log_to_mlflow(run_id: str, tracking_uri: str, results: dict, settings: EvalSettings) -> list[str]:
    """The metrics on the run (step 0), and per task an artifact eval/<task>.json with its results, document
    counts and the settings; returns the metric names. Re-running a task adds a newer value of each metric."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    metrics = metrics_of(results)
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])
    described = asdict(settings)
    for task, values in results["results"].items():
        record = {"results": values, "n-samples": results.get("n-samples", {}).get(task), "settings": described,
                  "lm_eval_version": _lm_eval_version()}
        client.log_text(run_id, json.dumps(record, indent=2, default=str), f"{EVAL_PREFIX}{_mlflow_key(task)}.json")
    return sorted(metrics)


def results_table(results: dict) -> str:
    """lm-eval's own markdown table of the results, for people."""
    from lm_eval.utils import make_table

    return make_table(results)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
