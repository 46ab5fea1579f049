"""`isoflop eval`: lm-evaluation-harness on both families, offline, its MLflow metrics, and `analyze --metric`."""
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import cli

from analysis.cli import main as analyze
from analysis.runs import from_mlflow, write_table
from analysis.synthetic import synthetic_runs
from pipeline.mlflow_keys import HASH_TAG
from pipeline.model.noise import MonteCarlo
from pipeline.training.run_folder import RunFolder
from pipeline.use.lm_eval import SHIPPED_TASKS, EvalSettings, evaluate, metrics_of
from pipeline.use.scoring import continuation_nll, evaluate_choices, read_tasks

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported: every task here reads local files
os.environ["HF_HUB_OFFLINE"] = "1"



LIMIT = 6  # documents per task: enough to compare, few enough for seconds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store with an experiment "evals" and, in it, a run that never finished: (uri, experiment id, run id)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import prepare_store

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    experiment = prepare_store(uri, "evals")
    return uri, experiment, MlflowClient(uri).create_run(experiment).info.run_id


def settings(*tasks: str, **kw) -> EvalSettings:
    return EvalSettings(tasks, **{"mc": MonteCarlo(samples=4, seed=3), "limit": LIMIT, **kw})


@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_multiple_choice_scores_as_isoflop_score_does(trained, family):
    """Each choice's loglikelihood is our own continuation_nll (exact for the ARM, the seeded K-draw bound
    for the MDM), so lm-eval's accuracy equals `isoflop score`'s on the same documents."""
    loaded = RunFolder(trained[family]).load()
    tokenizer = loaded.tokenizer()
    mc = MonteCarlo(samples=4, seed=3, guidance=0.5 if family == "mdm" else 0.0)
    results = evaluate(loaded.model, loaded.family, tokenizer, settings("synthetic_choice", mc=mc))
    documents = read_tasks(SHIPPED_TASKS / "synthetic.jsonl")[:LIMIT]
    samples = results["samples"]["synthetic_choice"]
    assert len(samples) == LIMIT
    for sample in samples:
        task = documents[sample["doc_id"]]
        harness = [resp[0][0] for resp in sample["resps"]]
        ours = [-continuation_nll(loaded.model, tokenizer.encode_prompt(task.context), tokenizer.encode(c), mc)
                for c in task.choices]
        assert harness == pytest.approx(ours, rel=1e-9, abs=1e-9)
        assert all(resp[0][1] is False for resp in sample["resps"])  # no task here reads is_greedy
    accuracy = evaluate_choices(loaded.model, tokenizer, documents, mc).accuracy
    assert metrics_of(results)["eval/synthetic_choice/acc"] == pytest.approx(accuracy)


@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_rolling_likelihood_and_generation(trained, family):
    loaded = RunFolder(trained[family]).load()
    tokenizer, model = loaded.tokenizer(), loaded.model
    mc = MonteCarlo(samples=4, seed=3)
    results = evaluate(model, loaded.family, tokenizer, settings("synthetic_perplexity", "synthetic_continue"))
    documents = read_tasks(SHIPPED_TASKS / "synthetic.jsonl")[:LIMIT]
    for sample in results["samples"]["synthetic_perplexity"]:  # a 7-token document: one window after EOS
        task = documents[sample["doc_id"]]
        tokens = tokenizer.encode(f"{task.context} {task.choices[task.answer]}")
        assert sample["resps"][0][0] == pytest.approx(-continuation_nll(model, [tokenizer.eos_id], tokens, mc))
    for sample in results["samples"]["synthetic_continue"]:  # one greedy token, through the family's sampler
        task = documents[sample["doc_id"]]
        prompt = torch.tensor([tokenizer.encode_prompt(task.context)])
        greedy = loaded.family.sample(model, prompt, length=1, temperature=0.0, seed=3).answer[0].tolist()
        assert sample["filtered_resps"][0] == str(greedy[0]) and sample["target"] == task.choices[task.answer].split()[0]
    metrics = metrics_of(results)
    assert metrics["eval/synthetic_continue/exact_match/strip"] == pytest.approx(sum(
        s["filtered_resps"][0] == s["target"] for s in results["samples"]["synthetic_continue"]) / LIMIT)
    assert metrics["eval/synthetic_perplexity/word_perplexity"] > 1


def write_task(folder, name: str, rows: list[dict]) -> None:
    """A user's task the way lm-eval takes one: a YAML over a local JSONL (`dataset_path: json`), no hub."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: ' {{continuation}}'\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n")


@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_an_included_task_reads_greedy_decoding(trained, tmp_path, family):
    """A `loglikelihood` task's acc asks whether greedy decoding gives the continuation: half the documents
    here continue with the model's own greedy tokens, the other half do not."""
    loaded = RunFolder(trained[family]).load()
    tokenizer, model = loaded.tokenizer(), loaded.model
    rows = []
    for k, context in enumerate(["447 13 32", "447 12 0", "448 5 7", "449 1 2"]):
        prompt = torch.tensor([tokenizer.encode_prompt(context)])
        greedy = loaded.family.sample(model, prompt, length=3, temperature=0.0, seed=3).answer[0].tolist()
        other = greedy if k % 2 == 0 else [(t + 1) % 400 for t in greedy]
        rows.append({"context": context, "continuation": " ".join(map(str, other))})
    write_task(tmp_path / "tasks", "own_greedy", rows)
    results = evaluate(model, loaded.family, tokenizer, settings("own_greedy", include_paths=(str(tmp_path / "tasks"),)))
    assert [s["resps"][0][0][1] for s in results["samples"]["own_greedy"]] == [True, False, True, False]
    assert metrics_of(results)["eval/own_greedy/acc"] == 0.5


def test_cli_logs_to_the_run_and_the_runs_table_carries_it(trained, store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri, experiment, _ = store
    client = MlflowClient(uri)
    runs = {}
    for family, folder in trained.items():  # grid-point runs as tracked before logged models
        spec = RunFolder(folder).description()["spec"]
        run = client.create_run(experiment, tags={HASH_TAG: family}).info.run_id
        for key, value in {"family": family, "budget": spec["budget"], "params": 1000, "tokens": 1e5}.items():
            client.log_param(run, key, value)
        client.log_metric(run, "val_loss", 5.0)
        for path in RunFolder(folder).files:
            client.log_artifact(run, str(path))
        client.set_terminated(run)
        runs[family] = run
    for family, extra in (("mdm", ["--samples", 4, "--cfg", 0.5]), ("arm", [])):
        code, out, err = cli(capsys, "eval", "--run", runs[family], "--tracking-uri", uri, "--tasks",
                             "synthetic_choice,synthetic_continue", "--limit", 4, *extra)
        assert code == 0, err
        printed = json.loads(out)["metrics"]
        logged = client.get_run(runs[family]).data.metrics
        assert logged["eval/synthetic_choice/acc"] == printed["eval/synthetic_choice/acc"]
        assert "eval/synthetic_continue/exact_match/strip" in logged and "logged" in err
        (tmp_path / family).mkdir()
        record = json.loads(Path(client.download_artifacts(runs[family], "eval/synthetic_choice.json",
                                                           str(tmp_path / family))).read_text())
        assert record["settings"]["limit"] == 4 and record["n-samples"]["effective"] == 4
    table = from_mlflow("evals", uri)
    assert set(table["eval/synthetic_choice/acc"]) == {client.get_run(r).data.metrics["eval/synthetic_choice/acc"]
                                                       for r in runs.values()}


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{missing}", "--tasks", "synthetic_choise"],  # the task is checked before the model
     "--tasks: unknown task 'synthetic_choise' (did you mean 'synthetic_choice'?)"),
    (["--checkpoint", "{arm}", "--tasks", "synthetic_choice", "--cfg", "1"], "is an ARM; --cfg"),
    (["--checkpoint", "{arm}", "--tasks", "synthetic_choice", "--include-path", "{missing}"],
     "--include-path: {missing}: no such folder"),
    (["--checkpoint", "{arm}", "--tasks", "synthetic_choice", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["--run", "{unfinished}", "--tracking-uri", "{uri}", "--tasks", "synthetic_choice"], "no checkpoint"),
])
def test_bad_input_is_one_line(trained, store, tmp_path, capsys, args, message):
    uri, _, unfinished = store
    names = {"arm": trained["arm"], "missing": tmp_path / "missing", "unfinished": unfinished, "uri": uri}
    capsys.readouterr()  # MLflow's notes on creating the store
    code, out, err = cli(capsys, "eval", *[a.format(**names) for a in args])
    assert code == 2 and out == "" and err.count("\n") == 1 and message.format(**names) in err, err


def test_analyze_plots_a_downstream_metric_against_compute(tmp_path, capsys):
    table = synthetic_runs(budgets=(1e19, 3e19, 1e20), sizes=5, seed=0)
    table["eval/synthetic_choice/acc"] = 1.0 - table["loss"] / 6  # better models score higher
    table["eval/synthetic_choice/acc_stderr"] = 0.01
    table.loc[::4, ["eval/synthetic_choice/acc", "eval/synthetic_choice/acc_stderr"]] = float("nan")  # not evaluated
    write_table(table, tmp_path / "runs.csv")
    out = tmp_path / "out"
    common = ["--runs", tmp_path / "runs.csv", "--out", out, "--bootstrap", "0"]
    assert analyze([str(a) for a in [*common, "--metric", "eval/synthetic_choice/acc"]]) == 0
    figure = out / "metric_eval_synthetic_choice_acc.png"
    assert figure.stat().st_size > 10_000 and "](metric_eval_synthetic_choice_acc.png)" in (out / "report.md").read_text()
    assert "eval/synthetic_choice/acc" in (out / "runs.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert analyze([str(a) for a in [*common, "--metric", "eval/synthetic_choice/acc_norm"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metric eval/synthetic_choice/acc_norm is not in the runs table; its " \
        "downstream metrics: eval/synthetic_choice/acc, eval/synthetic_choice/acc_stderr" in err


def test_other_commands_do_not_load_lm_eval():
    """lm_eval takes seconds to import: only `isoflop eval` loads it."""
    import subprocess
    import sys

    code = "import sys, pipeline.cli; print('lm_eval' in sys.modules, 'datasets' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, check=True)
    assert loaded.stdout.split() == ["False", "False"]
