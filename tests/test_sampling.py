"""Samplers, CFG, conditional likelihood, the multiple-choice evaluator, and `isoflop sample` / `isoflop score`."""
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from scipy import stats

from pipeline.data.dataset import load_tokenizer
from pipeline.data.synthetic import SyntheticLanguage, synthetic
from pipeline.errors import SamplingError
from pipeline.model.family import FAMILIES
from pipeline.model.noise import MonteCarlo, masking
from pipeline.model.sampling import (ArmSampling, MdmSampling, arm_sample, guided_logits, gumbel, gumbel_argmax,
                                     mdm_sample)
from pipeline.model.shapes import Shape
from pipeline.model.transformer import Transformer
from pipeline.use.scoring import ChoiceTask, continuation_nll, evaluate_choices

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FixedLogits(Transformer):
    """An MDM whose output at each position ignores the input: the distribution its samples follow is known."""

    def __init__(self, logits: torch.Tensor):
        super().__init__(FAMILIES["mdm"].model_config(Shape(1, 1, 2, 2), vocab_size=logits.shape[1], seq_len=logits.shape[0]))
        self.register_buffer("fixed", logits.float())
        self.calls, self.rows, self.inputs = 0, 0, []

    def forward(self, idx, cache=None):
        self.calls += 1
        self.rows += len(idx)
        self.inputs.append(idx.clone())
        return self.fixed[:idx.shape[1]].repeat(len(idx), 1, 1)


def random_model(family: str, vocab: int = 48, seq_len: int = 48, seed: int = 0) -> Transformer:
    """Weights larger than the training init, so that outputs depend clearly on the input."""
    torch.manual_seed(seed)
    model = Transformer(FAMILIES[family].model_config(Shape(2, 2, 32, 64), vocab, seq_len)).eval()
    for weight in (p for p in model.parameters() if p.dim() == 2):
        torch.nn.init.normal_(weight, std=0.3)
    return model


# ------------------------------------------------------------------------------------------- samplers

def test_reverse_sampler_draws_from_the_model_distribution():
    """steps = length, a fixed output per position: every answer token follows its position's distribution
    (temperature 1), or its square renormalised (temperature 1/2); the prompt stays as given."""
    even, odd = torch.tensor([0.5, 0.25, 0.15, 0.1]).double(), torch.tensor([0.1, 0.2, 0.3, 0.4]).double()
    length, prompt_len = 16, 2
    model = FixedLogits(torch.stack([even, odd] * 9).log())
    prompt = torch.tensor([[3, 1]]).repeat(500, 1)
    for temperature, power in ((1.0, 1), (0.5, 2)):
        out = mdm_sample(model, prompt, MdmSampling(length, steps=length, temperature=temperature, seed=1))
        assert torch.equal(out.tokens[:, :prompt_len], prompt)
        for parity, p in ((0, even), (1, odd)):
            tokens = out.tokens[:, prompt_len + parity::2]  # absolute position parity = the distribution used
            counts = torch.bincount(tokens.flatten(), minlength=4).numpy()
            expected = (p ** power / (p ** power).sum()).numpy() * counts.sum()
            assert stats.chisquare(counts, expected).pvalue > 1e-3, (temperature, parity, counts, expected)
    assert all((x[:, :prompt_len] == prompt[: len(x)]).all() for x in model.inputs)  # the prompt is never masked


def test_confidence_sampler_reveals_the_surest_positions_first():
    """Temperature 0, one token per step: position j's top probability rises with j, so the last is revealed first."""
    length = 6
    peak = torch.linspace(0.55, 0.95, length)
    probs = torch.stack([torch.tensor([p, 1 - p]) for p in peak])
    model = FixedLogits(probs.log())
    out = mdm_sample(model, torch.zeros(2, 0, dtype=torch.long), MdmSampling(length, sampler="confidence", temperature=0))
    assert (out.tokens == 0).all()
    mask = model.mask_token_id
    revealed = [(x[0] != mask).nonzero().flatten().tolist() for x in model.inputs]
    assert revealed == [list(range(length - k, length)) for k in range(length)]
    assert out.network_calls == length


def test_network_calls_are_skipped_when_no_token_changed():
    """Many more steps than tokens: most steps reveal nothing, and only rows that changed go to the network."""
    model = FixedLogits(torch.randn(8, 5))
    out = mdm_sample(model, torch.zeros(4, 0, dtype=torch.long), MdmSampling(8, steps=500, seed=3))
    assert (out.tokens != model.mask_token_id).all()
    assert out.network_calls == model.calls <= 4 * 8
    assert model.rows < 4 * model.calls  # calls forward only the rows that changed


def test_samplers_are_deterministic_given_a_seed():
    model = random_model("mdm")
    prompt = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(0))
    for sampler in ("reverse", "confidence"):
        settings = MdmSampling(16, steps=8, sampler=sampler, seed=7)
        assert torch.equal(mdm_sample(model, prompt, settings).tokens, mdm_sample(model, prompt, settings).tokens)
        other = mdm_sample(model, prompt, MdmSampling(16, steps=8, sampler=sampler, seed=8)).tokens
        assert not torch.equal(other, mdm_sample(model, prompt, settings).tokens)


def test_float32_gumbel_noise_under_draws_the_tail_of_a_peaked_distribution():
    """Why the samplers draw in float64. A top token and 10^4 tail tokens 18 nats below it: the tail holds
    1.5e-4 of the mass. float32 uniforms are multiples of 2^-24, so float32 noise stops at 16.6 and Gumbel-max
    draws the tail 12x too rarely. Seeing that by sampling takes ~1e9 draws, so the test computes the
    float32 sampler's probability exactly over every uniform it can use; float64 noise reaches 36.7 nats."""
    u = torch.arange(0, 2**24, dtype=torch.float32) / 2**24                 # every value torch.rand gives in float32
    assert torch.equal(torch.rand(10**5, generator=torch.Generator().manual_seed(0)) * 2**24 % 1, torch.zeros(10**5))
    noise = gumbel(u).double()                                               # sorted: gumbel is increasing in u
    tail_tokens = 10**4

    def tail_mass(gap: float) -> tuple[float, float]:
        """(float32 Gumbel-max, exact) probability that a tail token beats the top one."""
        below = torch.searchsorted(noise, noise + gap, right=True).double() / 2**24  # P(a tail noise <= top's + gap)
        exact = tail_tokens * math.exp(-gap) / (1 + tail_tokens * math.exp(-gap))
        return 1 - (below ** tail_tokens).mean().item(), exact

    float32, exact = tail_mass(12.0)
    assert float32 == pytest.approx(exact, rel=1e-2)                         # a tail 12 nats down: little harm
    float32, exact = tail_mass(18.0)
    assert float32 < exact / 5                                               # a peaked one: the tail is lost
    assert gumbel(torch.tensor([1 - 2**-53], dtype=torch.float64)).item() > 36  # float64 reaches far past the gap
    # and the samplers' draws are the float64 ones
    logits = torch.randn(64, 10)
    expected = (logits.double() + gumbel(torch.rand(64, 10, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(5)))).argmax(-1)
    assert torch.equal(gumbel_argmax(logits, 1.0, torch.Generator().manual_seed(5)), expected)


def test_kv_cached_and_uncached_arm_decoding_give_the_same_tokens():
    model = random_model("arm")
    prompt = torch.randint(0, 48, (3, 4), generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 0.0):
        cached = arm_sample(model, prompt, ArmSampling(40, temperature=temperature, seed=2))
        uncached = arm_sample(model, prompt, ArmSampling(40, temperature=temperature, seed=2, cache=False))
        assert torch.equal(cached.tokens, uncached.tokens)
        assert torch.equal(cached.tokens[:, :4], prompt) and cached.network_calls == 40


def test_unsupervised_cfg():
    """W = 0 is the plain conditional output; otherwise u + (W + 1)(c − u) with u from the prompt masked,
    both halves from one forward on the doubled batch."""
    model = random_model("mdm")
    x = torch.randint(0, 48, (2, 20), generator=torch.Generator().manual_seed(3))
    x[:, 12:] = model.mask_token_id
    with torch.no_grad():
        assert torch.equal(guided_logits(model, x, 6, 0.0), model(x))
        c = model(x)
        unconditional = x.clone()
        unconditional[:, :6] = model.mask_token_id
        u = model(unconditional)
        calls = []
        hook = model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
        guided = guided_logits(model, x, 6, 1.5)
        hook.remove()
    assert calls == [torch.Size([4, 20])]
    torch.testing.assert_close(guided, u + 2.5 * (c - u))
    # and in the sampler: W = 0 is the unguided sample, W != 0 changes it
    prompt = x[:, :6]
    plain = mdm_sample(model, prompt, MdmSampling(8, seed=4)).tokens
    assert torch.equal(mdm_sample(model, prompt, MdmSampling(8, seed=4, guidance=0.0)).tokens, plain)
    assert not torch.equal(mdm_sample(model, prompt, MdmSampling(8, seed=4, guidance=3.0)).tokens, plain)


@pytest.mark.parametrize("call, message", [
    (lambda m, a: mdm_sample(m, torch.zeros(1, 48, dtype=torch.long), MdmSampling(1)), "longer than the model context"),
    (lambda m, a: mdm_sample(m, torch.zeros(1, 40, dtype=torch.long), MdmSampling(9)), "use length <= 8"),
    (lambda m, a: mdm_sample(m, torch.zeros(1, 4, dtype=torch.long), MdmSampling(0)), "length must be positive"),
    (lambda m, a: mdm_sample(m, torch.zeros(1, 4, dtype=torch.long), MdmSampling(8, steps=0)), "steps must be positive"),
    (lambda m, a: mdm_sample(m, torch.zeros(1, 4, dtype=torch.long), MdmSampling(8, steps=9, sampler="confidence")),
     "steps (9) must be <= length (8)"),
    (lambda m, a: mdm_sample(m, torch.zeros(1, 4, dtype=torch.long), MdmSampling(8, temperature=-1)), "temperature"),
    (lambda m, a: mdm_sample(m, torch.full((1, 4), 48), MdmSampling(8)), "outside 0..47"),
    (lambda m, a: mdm_sample(a, torch.zeros(1, 4, dtype=torch.long), MdmSampling(8)), "is an ARM"),
    (lambda m, a: arm_sample(m, torch.zeros(1, 4, dtype=torch.long), ArmSampling(8)), "is an MDM"),
    (lambda m, a: arm_sample(a, torch.zeros(1, 0, dtype=torch.long), ArmSampling(8)), "at least one token"),
    (lambda m, a: continuation_nll(a, [1], [2], MonteCarlo(guidance=1.0)), "cfg needs an MDM"),
    (lambda m, a: continuation_nll(m, [1] * 40, [2] * 9), "use continuation length <= 8"),
    (lambda m, a: continuation_nll(m, [1], []), "continuation is empty"),
])
def test_bad_sampling_input_is_refused(call, message):
    with pytest.raises(SamplingError, match=re.escape(message)):
        call(random_model("mdm"), random_model("arm"))


# ---------------------------------------------------------------------------------------- likelihood

def overfit(family: str, sequence: torch.Tensor, steps: int = 300) -> Transformer:
    """A tiny model that has memorised one sequence (for an MDM: under every mask)."""
    torch.manual_seed(0)
    model = Transformer(FAMILIES[family].model_config(Shape(1, 2, 32, 128), vocab_size=32, seq_len=len(sequence)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    pad = sequence[:1]  # the ARM's loss reads block[:, :-1] and the MDM's block[:, 1:]: either way it sees `sequence`
    block = torch.cat([sequence, pad] if family == "arm" else [pad, sequence]).repeat(16, 1)
    for _ in range(steps):
        noise = masking(torch.rand(16, generator=gen), torch.rand(16, len(sequence), generator=gen), 1e-3)
        loss = FAMILIES[family].loss(model, block, noise if family == "mdm" else None)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_a_memorised_continuation_scores_better_than_a_random_one(family):
    gen = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, 32, (16,), generator=gen)
    model = overfit(family, sequence)
    context, memorised = sequence[:4].tolist(), sequence[4:].tolist()
    other = torch.randint(0, 32, (12,), generator=gen).tolist()
    for scoring in [MonteCarlo(samples=32)] + ([MonteCarlo(samples=32, guidance=1.0)] if family == "mdm" else []):
        good, bad = continuation_nll(model, context, memorised, scoring), continuation_nll(model, context, other, scoring)
        assert good < 0.25 * bad, (scoring, good, bad)
        assert continuation_nll(model, context, memorised, scoring) == good  # seeded: the same number every time


# -------------------------------------------------------------- trained checkpoints: evaluator and CLI

def synthetic_tasks(n: int, seed: int = 0) -> list[ChoiceTask]:
    rows = SyntheticLanguage().choice_tasks(n, np.random.default_rng(seed))
    return [ChoiceTask(r["context"], tuple(r["choices"]), r["answer"]) for r in rows]


def test_multiple_choice_on_a_task_the_trained_models_learned(trained):
    from pipeline.training.run_folder import RunFolder

    tasks = synthetic_tasks(24)
    for family, folder in trained.items():
        loaded = RunFolder(folder).load()
        assert loaded.family is FAMILIES[family]
        result = evaluate_choices(loaded.model, loaded.tokenizer(), tasks, MonteCarlo(samples=16))
        assert result.total == 24 and result.accuracy >= 0.8, (family, result)


def test_cli_sample_and_score(trained, tmp_path, capsys):
    mdm, arm = trained["mdm"], trained["arm"]
    code, out, err = cli(capsys, "sample", "--checkpoint", mdm, "--prompt", "450 3", "--length", 8, "--steps", 16, "--seed", 1)
    assert code == 0 and len(out.split()) == 8 and "network calls" in err
    assert cli(capsys, "sample", "--checkpoint", mdm, "--prompt", "450 3", "--length", 8, "--steps", 16, "--seed", 1)[1] == out
    code, out, _ = cli(capsys, "sample", "--checkpoint", mdm, "--prompt", "450", "--length", 8, "--steps", 4,
                       "--sampler", "confidence", "--cfg", 1.5, "--temperature", 0.5)
    assert code == 0 and len(out.split()) == 8
    code, out, _ = cli(capsys, "sample", "--checkpoint", arm, "--prompt", "450 3", "--length", 8, "--temperature", 0)
    assert code == 0 and all(0 <= int(t) < 512 for t in out.split()) and len(out.split()) == 8

    tasks = tmp_path / "tasks.jsonl"  # the first tasks of the file the synthetic corpus ships with
    tasks.write_text("".join((Path(mdm).parent / "data" / "tasks.jsonl").read_text().splitlines(keepends=True)[:12]))
    for folder, extra in ((mdm, ["--samples", 8, "--cfg", 0.5]), (arm, [])):
        code, out, _ = cli(capsys, "score", "--checkpoint", folder, "--tasks", tasks, *extra)
        report = json.loads(out)
        assert code == 0 and report["total"] == 12 and report["accuracy"] >= 0.75, report


@pytest.mark.parametrize("args, message", [
    (["sample", "--checkpoint", "{mdm}", "--prompt", " ".join(["1"] * 40)], "prompt of 41 tokens is longer than"),
    (["sample", "--checkpoint", "{mdm}", "--prompt", "1", "--length", "0"], "length must be positive"),
    (["sample", "--checkpoint", "{mdm}", "--prompt", "1", "--length", "31"], "use length <= 30"),
    (["sample", "--checkpoint", "{mdm}", "--prompt", "1", "--length", "8", "--steps", "0"], "steps must be positive"),
    (["sample", "--checkpoint", "{mdm}", "--prompt", "1", "--length", "4", "--sampler", "confidence", "--steps", "5"],
     "steps (5) must be <= length (4)"),
    (["sample", "--checkpoint", "{arm}", "--prompt", "1", "--sampler", "reverse"], "is an ARM; --sampler apply to other families only"),
    (["sample", "--checkpoint", "{arm}", "--prompt", "1", "--cfg", "1"], "is an ARM; --cfg"),
    (["sample", "--checkpoint", "{mdm}", "--prompt", "hello"], "give token ids 0..511"),
    (["sample", "--checkpoint", "{root}", "--prompt", "1"], "has no model.safetensors or result.json"),
    (["sample", "--checkpoint", "{root}/missing", "--prompt", "1"], "no such folder"),
    (["score", "--checkpoint", "{arm}", "--tasks", "{tasks}", "--cfg", "1"], "is an ARM; --cfg"),
    (["score", "--checkpoint", "{mdm}", "--tasks", "{root}/none.jsonl"], "no such file"),
    (["score", "--checkpoint", "{mdm}", "--tasks", "{bad_tasks}"], "bad.jsonl:2: 'answer' must be an index 0..1"),
])
def test_cli_bad_input_is_one_clear_line(trained, tmp_path, capsys, args, message):
    tasks, bad = tmp_path / "tasks.jsonl", tmp_path / "bad.jsonl"
    tasks.write_text(json.dumps({"context": "450", "choices": ["1", "2"], "answer": 0}) + "\n")
    bad.write_text(tasks.read_text() + json.dumps({"context": "450", "choices": ["1", "2"], "answer": 2}) + "\n")
    names = {"mdm": trained["mdm"], "arm": trained["arm"], "root": tmp_path, "tasks": tasks, "bad_tasks": bad}
    code, out, err = cli(capsys, *[a.format(**names) for a in args])
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_cli_asks_for_the_data_folder_when_the_run_trained_elsewhere(trained, tmp_path, capsys):
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(trained["mdm"] / "model.safetensors", moved)
    description = json.loads((trained["mdm"] / "result.json").read_text())
    (moved / "result.json").write_text(json.dumps({**description, "data": str(tmp_path / "elsewhere")}))
    code, _, err = cli(capsys, "sample", "--checkpoint", moved, "--prompt", "450", "--length", 4)
    assert code == 2 and "pass --data DIR" in err
    code, out, _ = cli(capsys, "sample", "--checkpoint", moved, "--prompt", "450", "--length", 4, "--data", description["data"])
    assert code == 0 and len(out.split()) == 4


def test_cli_loads_a_run_from_mlflow(trained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = prepare_store(uri, "sampling")
    finished = client.create_run(experiment).info.run_id
    for name in ("model.safetensors", "result.json"):
        client.log_artifact(finished, str(trained["mdm"] / name))
    unfinished = client.create_run(experiment).info.run_id
    code, out, _ = cli(capsys, "sample", "--run", finished, "--tracking-uri", uri, "--prompt", "450", "--length", 4)
    assert code == 0 and len(out.split()) == 4
    code, _, err = cli(capsys, "sample", "--run", unfinished, "--tracking-uri", uri, "--prompt", "450")
    assert code == 2 and "no checkpoint" in err
    code, _, err = cli(capsys, "sample", "--run", "0" * 32, "--tracking-uri", uri, "--prompt", "450")
    assert code == 2 and "not found" in err


def test_tokenizers_of_prepared_folders_round_trip(tmp_path):
    from pipeline.data.prepare import prepare
    from pipeline.errors import DataError

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Café number {i} ☃"}) + "\n" for i in range(40)))
    for spec in ("byte", "bpe:300"):
        tokenizer = load_tokenizer(prepare([str(docs)], tmp_path / spec.replace(":", ""), tokenizer=spec).path)
        ids = tokenizer.encode_prompt("Café ☃")
        assert ids[0] == tokenizer.eos_id and tokenizer.decode(ids) == "<|endoftext|>Café ☃"
    ids = load_tokenizer(synthetic(tmp_path / "synthetic", tokens=1000, val_tokens=100).path)
    assert ids.encode_prompt("450 3") == [511, 450, 3] and ids.decode([450, 3]) == "450 3"
    with pytest.raises(DataError, match="give token ids 0..511"):
        ids.encode("512")
