"""`isoflop export` and the run folder's weights format: an exported ARM is a transformers LlamaForCausalLM with
our logits, an exported MDM loads back into isoflop, run folders hold safetensors and still read model.pt."""
import filecmp
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import cli, write_word_jsonl
from safetensors.torch import load_file

from pipeline.data.dataset import load_dataset
from pipeline.data.prepare import prepare
from pipeline.data.synthetic import synthetic
from pipeline.model.family import FAMILIES
from pipeline.model.flops import budget_for_steps
from pipeline.model.shapes import Shape
from pipeline.model.transformer import Transformer
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.loop import TrainResult
from pipeline.training.run_folder import LEGACY_WEIGHTS, WEIGHTS, RunFolder
from pipeline.use.loading import load_trained

SHAPE = Shape(2, 2, 32, 64)
SEQ_LEN = 32
TEXTS = {"synthetic": "450 3 17", "byte": "Café ☃ alpha\n", "bpe:300": "alpha beta Café"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """A data folder of each tokenizer kind: {"synthetic", "byte", "bpe:300"} -> folder."""
    root = tmp_path_factory.mktemp("data")
    docs = write_word_jsonl(root / "docs.jsonl", 60)
    folders = {"synthetic": synthetic(root / "synthetic", tokens=2000, val_tokens=200).path}
    for spec in ("byte", "bpe:300"):
        folders[spec] = prepare([str(docs)], root / spec.replace(":", ""), tokenizer=spec, val_fraction=0.1).path
    return folders


def finished_run(folder: Path, family: str, data: Path, seed: int = 0) -> Path:
    """A finished run's folder as training writes it, holding random weights (seconds instead of a training run).
    The weights are larger than the training init and the norms not all ones, so every tensor shows in the logits."""
    info = load_dataset(data).info
    recipe = TrainConfig(seq_len=SEQ_LEN, batch_size=8)
    spec = RunSpec(family=family, shape=SHAPE, budget=budget_for_steps(SHAPE, 10, batch_size=8, seq_len=SEQ_LEN),
                   train=recipe)
    torch.manual_seed(seed)
    model = Transformer(FAMILIES[family].model_config(SHAPE, info.vocab_size, SEQ_LEN))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 if p.dim() == 2 else 1 + 0.3 * torch.randn_like(p))
    numbers = {f.name: 1 for f in fields(TrainResult) if f.type in ("int", "float", int, float)}
    result = TrainResult(**{**numbers, "run_hash": spec.run_hash, "family": family, "model": SHAPE.label,
                            "flops_convention": "6ND"})
    RunFolder(folder).write(model.state_dict(), spec, info, result)
    return folder


def random_ids(vocab: int, rows: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- ARM

@pytest.mark.parametrize("kind", ["bpe:300", "byte", "synthetic"])
def test_exported_arm_is_a_transformers_llama_with_our_logits_and_tokenizer(corpora, tmp_path, capsys, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    run = finished_run(tmp_path / "run", "arm", corpora[kind])
    code, out, err = cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "hf")
    assert code == 0 and "LlamaForCausalLM" in out, err
    ours = RunFolder(run).load("cpu")

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(theirs, LlamaForCausalLM) and theirs.dtype == torch.float32
    ids = random_ids(ours.model.config.vocab_size)
    with torch.no_grad():
        expected, got = ours.model(ids), theirs(ids).logits
    assert expected.abs().max() > 1 and (got - expected).abs().max() < 1e-4, (got - expected).abs().max()

    # greedy decoding through transformers' own KV cache picks our tokens (it stops early only at EOS)
    tokenizer = ours.tokenizer()
    prompt = torch.tensor([tokenizer.encode_prompt(TEXTS[kind])])
    mine = ours.family.sample(ours.model, prompt, length=8, temperature=0).tokens[0].tolist()
    generated = theirs.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt),
                                pad_token_id=tokenizer.eos_id)[0].tolist()
    assert len(generated) > prompt.shape[1] and mine[:len(generated)] == generated

    # the tokenizer: text to ids as isoflop's prompts (EOS first), ids to text as isoflop decodes
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(TEXTS[kind])["input_ids"] == tokenizer.encode_prompt(TEXTS[kind])
    assert hf_tokenizer.decode(mine) == tokenizer.decode(mine)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id == theirs.config.eos_token_id

    # and isoflop reads the export back
    again = load_trained(folder=tmp_path / "hf", device="cpu")
    assert again.family is FAMILIES["arm"] and torch.equal(again.model(ids), expected)
    assert again.tokenizer().encode_prompt(TEXTS[kind]) == tokenizer.encode_prompt(TEXTS[kind])


# ------------------------------------------------------------------------------------------- MDM

def test_exported_mdm_names_its_mask_token_and_loads_back_with_identical_logits(corpora, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = finished_run(tmp_path / "run", "mdm", corpora["bpe:300"])
    out = tmp_path / "export"
    code, printed, err = cli(capsys, "export", "--checkpoint", run, "--out", out)
    ours = RunFolder(run).load("cpu")
    vocab = ours.model.config.vocab_size
    assert code == 0 and f"mask token id {vocab}" in printed, err

    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == vocab and config["is_causal"] is False and config["model_type"] == "isoflop_mdm"
    assert config["isoflop"]["family"] == "mdm" and config["isoflop"]["run"] == ours.description
    assert AutoTokenizer.from_pretrained(out).mask_token_id == vocab
    with pytest.raises((ValueError, KeyError, OSError)):  # no transformers class runs it: refused, not misread
        AutoModelForCausalLM.from_pretrained(out)

    loaded = load_trained(folder=out, device="cpu")
    ids = random_ids(vocab)
    ids[:, ::3] = vocab  # a third of the positions masked
    assert loaded.family is FAMILIES["mdm"] and loaded.model.mask_token_id == vocab
    assert torch.equal(loaded.model(ids), ours.model(ids))

    # `--checkpoint` takes the export, with the tokenizer it carries, even once the data folder is gone
    sample = ["sample", "--prompt", "alpha beta", "--length", 6, "--steps", 6, "--seed", 3]
    from_run = cli(capsys, *sample, "--checkpoint", run)
    (tmp_path / "moved").mkdir()
    moved = out.rename(tmp_path / "moved" / "export")
    json_path = moved / "config.json"
    json_path.write_text(json.dumps({**config, "isoflop": {**config["isoflop"], "run": {
        **config["isoflop"]["run"], "data": str(tmp_path / "gone")}}}))
    from_export = cli(capsys, *sample, "--checkpoint", moved)
    assert from_run[0] == from_export[0] == 0 and from_run[1] == from_export[1] != ""


# ------------------------------------------------------------------------------------------- run folders

def test_run_folders_hold_safetensors_and_older_model_pt_folders_still_load(corpora, tmp_path):
    run = finished_run(tmp_path / "run", "arm", corpora["synthetic"])
    assert (run / WEIGHTS).is_file() and not (run / LEGACY_WEIGHTS).exists()
    assert RunFolder(run).files == [run / WEIGHTS, run / "result.json"]
    state = load_file(run / WEIGHTS)  # a plain tensor file: nothing is unpickled
    fresh = RunFolder(run).load("cpu").model
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())

    torch.save(state, run / LEGACY_WEIGHTS)  # as a run finished before safetensors left it
    (run / WEIGHTS).unlink()
    assert RunFolder(run).files[0] == run / LEGACY_WEIGHTS
    ids = random_ids(fresh.config.vocab_size)
    assert torch.equal(RunFolder(run).load("cpu").model(ids), fresh(ids))


def test_export_from_mlflow_and_its_errors(corpora, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RunLogger, prepare_store

    run = finished_run(tmp_path / "run", "arm", corpora["synthetic"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = prepare_store(uri, "export")
    logger = RunLogger(uri, experiment, RunSpec(**RunFolder(run).description()["spec"]))
    logger.finish(RunFolder(run).result(), RunFolder(run).files)  # as a sweep: the weights in the logged model
    logged = logger.run_id
    finished = client.create_run(experiment).info.run_id  # as runs were tracked before: weights among its artifacts
    for path in RunFolder(run).files:
        client.log_artifact(finished, str(path))
    legacy = client.create_run(experiment).info.run_id  # finished before run folders held safetensors
    (tmp_path / "legacy").mkdir()
    torch.save(load_file(run / WEIGHTS), tmp_path / "legacy" / LEGACY_WEIGHTS)
    for path in (tmp_path / "legacy" / LEGACY_WEIGHTS, run / "result.json"):
        client.log_artifact(legacy, str(path))
    unfinished = client.create_run(experiment).info.run_id
    client.log_artifact(unfinished, str(run / "result.json"))  # a description without weights

    code, _, _ = cli(capsys, "export", "--run", finished, "--tracking-uri", uri, "--out", tmp_path / "a")
    assert code == 0 and (tmp_path / "a" / "model.safetensors").is_file()
    for source, out in ((legacy, "a-legacy"), (logged, "a-logged")):
        code, _, err = cli(capsys, "export", "--run", source, "--tracking-uri", uri, "--out", tmp_path / out)
        assert code == 0, err
        assert filecmp.cmp(tmp_path / "a" / WEIGHTS, tmp_path / out / WEIGHTS, shallow=False)
    code, _, err = cli(capsys, "export", "--run", unfinished, "--tracking-uri", uri, "--out", tmp_path / "b")
    assert code == 2 and err.count("\n") == 1 and f"--run {unfinished}: no checkpoint" in err and WEIGHTS in err
    assert not (tmp_path / "b").exists()

    training = tmp_path / "training"
    (training / "checkpoints").mkdir(parents=True)  # a run still training: DeepSpeed checkpoints only
    code, _, err = cli(capsys, "export", "--checkpoint", training, "--out", tmp_path / "c")
    assert code == 2 and err.count("\n") == 1 and f"{training} has no {WEIGHTS} or result.json" in err
    assert "unfinished run" in err

    code, _, err = cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and "already holds an export; pass --overwrite" in err
    code, _, err = cli(capsys, "export", "--checkpoint", run, "--out", run)
    assert code == 2 and err.count("\n") == 1 and "is not an empty folder" in err
    code, _, _ = cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "a", "--overwrite")
    assert code == 0 and not list(tmp_path.glob(".a.partial-*"))
