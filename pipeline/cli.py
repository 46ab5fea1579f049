"""The `isoflop` command: thin subcommands over the library. Heavy imports happen inside each one.

Errors a user can fix (the IsoflopError family) are printed as one line with exit code 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.errors import ConfigError, IsoflopError
from pipeline.mlflow_keys import DEFAULT_TRACKING_URI


def cmd_models(args) -> int:
    from pipeline.model.shapes import REGISTRY

    columns = ("name", "n_layer", "n_head", "d_model", "d_ff", "non_embedding_params")
    rows = [(name, s.n_layer, s.n_head, s.d_model, s.d_ff, s.non_embedding_params()) for name, s in REGISTRY.items()]
    if args.format == "csv":
        print(",".join(columns))
        for row in rows:
            print(",".join(map(str, row)))
    else:
        print(f"{'name':<12}{'layers':>7}{'heads':>6}{'d_model':>8}{'d_ff':>7}{'N (non-emb)':>16}")
        for name, *rest, n in rows:
            print(f"{name:<12}{rest[0]:>7}{rest[1]:>6}{rest[2]:>8}{rest[3]:>7}{n:>16,}")
    return 0


def cmd_data_prepare(args) -> int:
    from pipeline.data.prepare import prepare

    info = prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                   text_field=args.text_field, max_missing=args.max_missing, jobs=args.jobs, overwrite=args.overwrite,
                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"dataset {info.path}: {info.tokens['train']:,} train + {info.tokens['val']:,} val tokens, "
          f"vocab {info.vocab_size}, fingerprint {info.fingerprint}")
    return 0


def cmd_data_synthetic(args) -> int:
    from pipeline.data.synthetic import synthetic

    info = synthetic(args.out, tokens=args.tokens, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {info.path}: {info.tokens['train']:,} train + {info.tokens['val']:,} val tokens, "
          f"vocab {info.vocab_size}, entropy rate {info.entropy_rate_nats:.4f} nats/token")
    return 0


def _run_spec(args):
    from pydantic import ValidationError

    from pipeline.recipe import RunSpec, TrainConfig, format_validation_error, parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.zero_stage is not None:
        overrides["zero_stage"] = args.zero_stage
    try:
        recipe = TrainConfig(**overrides)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "train")) from None
    try:
        flops = float(args.flops)
    except ValueError:
        raise ConfigError(f"--flops: expected a number of FLOPs, got {args.flops!r}") from None
    try:
        return RunSpec(family=args.family, shape=args.model, budget=flops, train=recipe)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def _train_worker(spec, data_dir, out_dir) -> None:
    from pipeline.training.loop import train

    train(spec, data_dir, out_dir)


def cmd_train(args) -> int:
    import torch

    from pipeline.training import distributed
    from pipeline.training.loop import check_run
    from pipeline.training.run_folder import RunFolder

    spec = _run_spec(args)
    workers = args.workers or max(1, torch.cuda.device_count())
    data, _ = check_run(spec, args.data, workers)
    spec = spec.model_copy(update={"data_fingerprint": data.info.fingerprint})
    folder = RunFolder(args.out)
    if folder.is_finished(spec.run_hash):
        print(f"{args.out} already holds this finished run ({spec.run_hash}); nothing to do", file=sys.stderr)
    else:
        distributed.spawn(_train_worker, workers, spec, args.data, args.out)
    print(json.dumps(folder.result()))
    return 0


def cmd_sweep(args) -> int:
    if args.submit:
        from pipeline.sweep.submit import submit_sweep

        if args.dry_run or args.rerun_failed:
            raise ConfigError("--submit: run --dry-run here without it; --rerun-failed is not passed to a job")
        return submit_sweep(args.file, address=args.address, tracking_uri=args.tracking_uri)
    from pipeline.sweep.driver import run_sweep

    return run_sweep(args.file, address=args.address, tracking_uri=args.tracking_uri, rerun_failed=args.rerun_failed,
                     dry_run=args.dry_run, verbose=args.verbose)


def cmd_status(args) -> int:
    from pipeline.sweep.submit import sweep_status

    return sweep_status(args.name, address=args.address)


def cmd_runs(args) -> int:
    from analysis.runs import from_mlflow, write_table
    from pipeline.mlflow_keys import resolve_uri

    table = from_mlflow(args.experiment, resolve_uri(args.tracking_uri), finished_only=False)
    write_table(table, args.out)
    print(f"wrote {len(table)} runs to {args.out}")
    return 0


def cmd_ui(args) -> int:
    from pipeline.mlflow_keys import resolve_uri
    from pipeline.ui import serve, study_urls

    uri = resolve_uri(args.tracking_uri)
    lines = study_urls(uri, f"http://127.0.0.1:{args.port}", args.experiment)  # before the server creates the store
    return serve(uri, args.port, [f"store {uri}", *lines])


def cmd_sample(args) -> int:
    import time

    import torch

    from pipeline.use.loading import load_trained

    trained = load_trained(folder=args.checkpoint, run=args.run, tracking_uri=args.tracking_uri)
    options = {"steps": args.steps, "sampler": args.sampler, "guidance": args.guidance}
    _refuse_options(trained, trained.family.sample_options, options)
    tokenizer = trained.tokenizer(args.data)
    prompt = torch.tensor([tokenizer.encode_prompt(args.prompt)], device=trained.device)
    started = time.perf_counter()
    given = {k: v for k, v in options.items() if v is not None}
    sample = trained.family.sample(trained.model, prompt, length=args.length, temperature=args.temperature,
                                   seed=args.seed, **given)
    print(tokenizer.decode(sample.answer[0].tolist()))
    print(f"[{trained.family.name} {sample.method}] {args.length} tokens, {sample.network_calls} network calls, "
          f"{time.perf_counter() - started:.2f}s", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from pipeline.model.noise import MonteCarlo
    from pipeline.use.loading import load_trained
    from pipeline.use.scoring import evaluate_choices, read_tasks

    tasks = read_tasks(args.tasks)
    trained = load_trained(folder=args.checkpoint, run=args.run, tracking_uri=args.tracking_uri)
    _refuse_options(trained, trained.family.score_options, {"guidance": args.guidance or None})
    tokenizer = trained.tokenizer(args.data)
    result = evaluate_choices(trained.model, tokenizer, tasks, MonteCarlo(samples=args.samples, guidance=args.guidance, seed=args.seed))
    print(json.dumps({"family": trained.family.name, "source": trained.source, "accuracy": result.accuracy,
                      "correct": result.correct, "total": result.total,
                      **{name: getattr(args, name) for name in trained.family.score_options}}))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from pipeline.use.export import check_out, export
    from pipeline.use.loading import load_trained

    check_out(Path(args.out), args.overwrite)  # before a download
    trained = load_trained(folder=args.checkpoint, run=args.run, tracking_uri=args.tracking_uri, device="cpu")
    exported = export(trained, args.out, trained.tokenizer(args.data), overwrite=args.overwrite)
    print(f"wrote {exported.path}: {exported.loads_with}")
    return 0


def cmd_eval(args) -> int:
    # lm_eval, which pipeline.use.lm_eval imports, takes seconds to load: only this command pays for it
    from pipeline.model.noise import MonteCarlo
    from pipeline.use.lm_eval import EvalSettings, evaluate, log_to_mlflow, metrics_of, results_table, task_manager
    from pipeline.use.loading import load_trained

    tasks = tuple(name.strip() for name in args.tasks.split(",") if name.strip())
    for name, value, least in (("--samples", args.samples, 1), ("--limit", args.limit, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    include_paths = tuple(args.include_path or ())
    manager = task_manager(tasks, include_paths)  # unknown tasks fail here, before any loading
    trained = load_trained(folder=args.checkpoint, run=args.run, tracking_uri=args.tracking_uri)
    sampling = {"steps": args.steps, "sampler": args.sampler}
    _refuse_options(trained, trained.family.sample_options, sampling)
    _refuse_options(trained, trained.family.score_options, {"guidance": args.guidance or None})
    if trained.family.score_options:  # the MDM guides its generations as it guides its likelihoods
        sampling["guidance"] = args.guidance
    settings = EvalSettings(tasks, include_paths,
                            MonteCarlo(samples=args.samples, guidance=args.guidance, seed=args.seed),
                            {k: v for k, v in sampling.items() if v is not None}, args.limit, args.num_fewshot)
    results = evaluate(trained.model, trained.family, trained.tokenizer(args.data), settings, manager)
    metrics = metrics_of(results)
    print(results_table(results), file=sys.stderr)
    print(json.dumps({"family": trained.family.name, "source": trained.source, "metrics": metrics}))
    if args.run:
        from pipeline.mlflow_keys import resolve_uri

        logged = log_to_mlflow(args.run, resolve_uri(args.tracking_uri), results, settings)
        print(f"logged {len(logged)} metrics to MLflow run {args.run}", file=sys.stderr)
    else:
        print("a --checkpoint has no MLflow run: nothing logged (evaluate with --run RUN_ID to log)", file=sys.stderr)
    return 0


# An option's flag where the two names differ: the guidance weight is "CFG" (classifier-free guidance) on the command line
FLAGS = {"guidance": "--cfg"}


def _refuse_options(trained, accepted: tuple[str, ...], given: dict) -> None:
    """Options the model's family has no use for are an error, not silently ignored."""
    unused = [FLAGS.get(name, f"--{name}") for name, value in given.items() if value is not None and name not in accepted]
    if unused:
        raise ConfigError(f"{trained.source} is an {trained.family!r}; {', '.join(unused)} apply to other families only")


def _model_source_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """The options `sample`, `score`, `eval` and `export` share: which model, and where its tokenizer is."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_ID", help="an MLflow run id of a finished grid point")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="a finished run's folder (`isoflop train --out`, or a sweep's runs/<hash>), "
                             "or one `isoflop export` wrote")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help=f"with --run (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    p.add_argument("--data", metavar="DIR", default=None, help="the data folder whose tokenizer to use (default: the run's)")
    if seed:
        p.add_argument("--seed", type=int, metavar="S", default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isoflop", description="IsoFLOP scaling studies of MDM and ARM language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered model shapes")
    p.add_argument("--format", choices=("table", "csv"), default="table")
    p.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="prepare token data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize .txt/.jsonl/.parquet files (plain, .gz or .zst) into memmap shards")
    p.add_argument("inputs", nargs="+", help="files or globs (quote them: the program expands them)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="byte", help="byte | bpe:VOCAB (trained on the input) | PATH/tokenizer.json")
    p.add_argument("--text-field", default="text", help="the .jsonl field or .parquet column holding each document")
    p.add_argument("--max-missing", type=float, default=0.01,
                   help="fail if more than this fraction of records lack the text field (default 0.01)")
    p.add_argument("--jobs", type=int, default=None, help="tokenizing worker processes (default: one per core)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made from other inputs, or rebuild")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("synthetic", help="generate the built-in synthetic corpus (known entropy rate)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_synthetic)

    p = sub.add_parser("train", help="train one model to a FLOP budget")
    p.add_argument("--family", required=True, help="mdm or arm")
    p.add_argument("--model", required=True, help="a shape name (see `isoflop models`) or '{n_layer: 2, n_head: 2, d_model: 64}'")
    p.add_argument("--flops", required=True, help="the FLOP budget C")
    p.add_argument("--data", required=True, help="a folder made by `isoflop data`")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0, help="ranks (CPU processes, or GPUs); default: GPUs or 1")
    p.add_argument("--zero-stage", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, e.g. lr=1e-3 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run an IsoFLOP sweep file on Ray (skips finished points, resumes interrupted ones)")
    p.add_argument("file")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster, <head-ip>:6379 (default: $RAY_ADDRESS, else start a local one); "
                        "with --submit its job server, http://<head-ip>:8265")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the file's)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    p.add_argument("--rerun-failed", action="store_true", help="run points that failed before again")
    p.add_argument("--verbose", action="store_true",
                   help="show every point's and Ray's raw output here (default: a progress table; each point's "
                        "output in {storage}/logs/{run name}.log)")
    p.add_argument("--submit", action="store_true",
                   help="run the sweep as a Ray job on the cluster and return at once (see `isoflop status`)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="a sweep submitted as a Ray job: its jobs, last progress line and runs")
    p.add_argument("name", help="the sweep's name (its file's `name:`)")
    p.add_argument("--address", default=None, help="the Ray job server (default: $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("runs", help="export a sweep's runs table from MLflow")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", required=True, help="FILE.parquet or FILE.csv")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the store in use; prints the study's URL")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--experiment", metavar="NAME", default=None, help="print the URL of this sweep's own run")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("sample", help="generate from a trained model (MDM reverse/confidence sampler, or ARM)")
    _model_source_args(p)
    p.add_argument("--prompt", metavar="TEXT", required=True,
                   help="text (token ids separated by spaces for the synthetic corpus); the model sees EOS, then this")
    p.add_argument("--length", type=int, metavar="L", default=64, help="tokens to generate")
    p.add_argument("--steps", type=int, metavar="K", default=None, help="MDM: sampling steps (default: --length)")
    p.add_argument("--sampler", choices=("reverse", "confidence"), default=None, help="MDM (default: reverse)")
    p.add_argument("--cfg", dest="guidance", type=float, metavar="W", default=None, help="MDM: unsupervised classifier-free guidance weight")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0, help="0 = greedy")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("score", help="multiple-choice accuracy by conditional likelihood over a JSONL task file")
    _model_source_args(p)
    p.add_argument("--tasks", metavar="FILE.jsonl", required=True,
                   help='one {"context": str, "choices": [str, ...], "answer": index} per line')
    p.add_argument("--samples", type=int, metavar="K", default=128, help="MDM: Monte Carlo draws per continuation")
    p.add_argument("--cfg", dest="guidance", type=float, metavar="W", default=0.0, help="MDM: unsupervised classifier-free guidance weight")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="a trained model as safetensors + config + tokenizer (an ARM as a Hugging Face "
                                      "LlamaForCausalLM folder)")
    _model_source_args(p, seed=False)
    p.add_argument("--out", metavar="DIR", required=True, help="a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks; with --run, metrics eval/<task>/<metric> go to MLflow")
    _model_source_args(p)
    p.add_argument("--tasks", metavar="T1,T2", required=True,
                   help="lm-eval task names: shipped (synthetic_choice, synthetic_continue, synthetic_perplexity), "
                        "from --include-path, or lm-eval's own (which download their data)")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable)")
    p.add_argument("--samples", type=int, metavar="K", default=128, help="MDM: Monte Carlo draws per likelihood")
    p.add_argument("--cfg", dest="guidance", type=float, metavar="W", default=0.0,
                   help="MDM: unsupervised classifier-free guidance weight, for likelihoods and generation")
    p.add_argument("--steps", type=int, metavar="K", default=None, help="MDM generation: sampling steps (default: length)")
    p.add_argument("--sampler", choices=("reverse", "confidence"), default=None, help="MDM generation (default: reverse)")
    p.add_argument("--limit", type=int, metavar="N", default=None, help="the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, metavar="N", default=None, help="few-shot examples (default: the task's)")
    p.set_defaults(func=cmd_eval)

    # `analyze` belongs to the analysis package, which parses its own arguments (see main)
    sub.add_parser("analyze", add_help=False, help="fit scaling laws and the compute gap; plots and report")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyze"]:
        from analysis.cli import main as analyze

        return analyze(argv[1:], prog="isoflop analyze")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IsoflopError as err:  # DataError, BudgetError, SweepError, ...: each says what is wrong
        print(f"isoflop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
