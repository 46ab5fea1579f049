import ast
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline.data.prepare as preparing
from pipeline.data import tokenizer as tokenizer_module
from pipeline.data.dataset import load_dataset, load_tokenizer
from pipeline.data.prepare import prepare
from pipeline.data.synthetic import SyntheticLanguage, SyntheticSpec, synthetic
from pipeline.errors import DataError

WORDS = "the cat dog sat on a mat ran far away quickly and then slept under old green tree".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 40))) + f" doc{i}." for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_dataset(synthetic(tmp_path_factory.mktemp("syn") / "d", tokens=20_000, val_tokens=3_000, seed=1).path)


@pytest.fixture(scope="module")
def language():
    return SyntheticLanguage()


# ------------------------------------------------------------------------------------------ batches

def batch(ds, **kw):
    args = dict(step=0, rank=0, world_size=1, batch_size=4, seq_len=16, seed=3)
    return ds.train_batch(**{**args, **kw})


def test_train_batch_is_a_pure_function(corpus, tmp_path):
    b = batch(corpus, step=7)
    assert b.dtype == torch.long and b.shape == (4, 17)
    assert torch.equal(b, batch(corpus, step=7))
    assert torch.equal(b, batch(load_dataset(corpus.info.path), step=7))  # a fresh process/resume reads the same
    assert not torch.equal(b, batch(corpus, step=8))
    assert not torch.equal(b, batch(corpus, step=7, seed=4))
    assert 0 <= int(b.min()) and int(b.max()) < corpus.info.vocab_size


def test_ranks_split_one_global_batch(corpus):
    for step in range(5):
        ranks = [batch(corpus, step=step, rank=r, world_size=2) for r in range(2)]
        rows = {tuple(row.tolist()) for r in ranks for row in r}
        assert len(rows) == 8  # the two ranks' blocks do not overlap
        # 2 ranks of batch 4 read exactly the blocks 1 rank of batch 8 reads, in the same order
        assert torch.equal(torch.cat(ranks), batch(corpus, step=step, batch_size=8))


def test_blocks_are_aligned_windows_visited_once_per_epoch(corpus):
    train = np.fromfile(corpus.info.path / "train.bin", dtype=np.uint16).astype(np.int64)
    n = corpus.num_train_blocks(16)
    assert n == len(train) // 17
    windows = {tuple(train[i * 17:(i + 1) * 17]) for i in range(n)}
    steps = math.ceil(n / 8)
    first_epoch = torch.cat([batch(corpus, step=s, batch_size=8) for s in range(steps)])[:n]
    seen = [tuple(row.tolist()) for row in first_epoch]
    assert set(seen) == windows and len(seen) == n  # every block once, no repeats
    # past the end a fresh permutation starts instead of failing
    assert batch(corpus, step=10 * steps, batch_size=8).shape == (8, 17)


def test_val_blocks_are_fixed(corpus):
    v = corpus.val_blocks(seq_len=16, max_blocks=10)
    assert v.shape == (10, 17) and torch.equal(v, corpus.val_blocks(seq_len=16, max_blocks=10))
    assert corpus.val_blocks(seq_len=16, max_blocks=10_000).shape[0] == 3_000 // 17
    with pytest.raises(DataError, match="val split"):
        corpus.val_blocks(seq_len=5_000, max_blocks=1)


# ------------------------------------------------------------------------------------------ prepare

def write_inputs(folder, kind: str, docs: list[str]) -> str:
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        path = folder / f"part{i}.{kind}"
        if kind == "txt":
            path.write_text("\n\n\n".join(part) + "\n")
        elif kind == "jsonl":
            path.write_text("".join(json.dumps({"text": d, "id": j}) + "\n" for j, d in enumerate(part)))
        else:
            pq.write_table(pa.table({"text": part}), path)
    return str(folder / f"part*.{kind}")


def split_documents(ds, split: str, decode) -> list[str]:
    ids = ds.read_split(split)
    assert ids[-1] == ds.info.eos_id
    documents_with_eos = np.split(ids, np.flatnonzero(ids == ds.info.eos_id) + 1)[:-1]
    return [decode(doc[:-1]) for doc in documents_with_eos]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_prepare_round_trips(tmp_path, kind, tokenizer):
    docs = documents(60)
    pattern = write_inputs(tmp_path, kind, docs)
    info = prepare([pattern], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.1, seed=5)
    ds = load_dataset(tmp_path / "out")
    assert ds.info == info
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert {"vocab_size", "eos_id", "tokenizer", "fingerprint", "tokens", "dtype", "bytes_per_token"} <= set(meta)
    assert meta["documents"] == {"train": 54, "val": 6} and meta["dtype"] == "uint16"
    if tokenizer == "byte":
        assert (info.vocab_size, info.eos_id) == (257, 256)
        decode = lambda ids: bytes(ids.astype(np.uint8)).decode()  # noqa: E731
    else:
        from tokenizers import Tokenizer
        hf = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
        assert info.vocab_size == hf.get_vocab_size() <= 300 and hf.id_to_token(info.eos_id) == tokenizer_module.EOS
        decode = lambda ids: hf.decode(ids.tolist())  # noqa: E731
    train, val = split_documents(ds, "train", decode), split_documents(ds, "val", decode)
    assert len(val) == 6 and sorted(train + val) == sorted(docs)  # split by whole documents, none lost
    # val bytes over val tokens (EOS included): below 1 for bytes, above 1 once BPE merges
    val_bytes = sum(len(d.encode()) for d in val)
    assert info.bytes_per_token == pytest.approx(val_bytes / info.tokens["val"])
    assert (info.bytes_per_token < 1) == (tokenizer == "byte")
    # same inputs and options: nothing to do; other options: refuses to overwrite unless asked
    assert prepare([pattern], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.1, seed=5) == info
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare([pattern], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.1, seed=6)
    again = prepare([pattern], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.1, seed=5, overwrite=True)
    assert again.fingerprint == info.fingerprint


def test_existing_tokenizer_gets_an_eos(tmp_path):
    pattern = write_inputs(tmp_path, "txt", documents(20))
    first = prepare([pattern], tmp_path / "a", tokenizer="bpe:280")
    from tokenizers import Tokenizer, models
    plain = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS + ["[UNK]"])}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "plain.json"))
    reused = prepare([pattern], tmp_path / "b", tokenizer=str(tmp_path / "a" / "tokenizer.json"))
    assert reused.vocab_size == first.vocab_size and reused.eos_id == first.eos_id
    added = prepare([pattern], tmp_path / "c", tokenizer=str(tmp_path / "plain.json"))
    assert added.eos_id == len(WORDS) + 1 == added.vocab_size - 1


def test_bad_inputs_name_the_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("one\n\ntwo\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.txt").write_bytes("ok\n\ncaf\xe9".encode("latin-1"))
    (tmp_path / "notes.md").write_text("x")
    cases = {str(tmp_path / "missing.txt"): "missing.txt: no such file",
             str(tmp_path / "empty.jsonl"): "empty.jsonl: empty",
             str(tmp_path / "*.parquet"): r"no file matches .*\*\.parquet",
             str(tmp_path / "latin1.txt"): "latin1.txt: not UTF-8 at byte 7",
             str(tmp_path / "notes.md"): "unsupported file type"}
    for bad, message in cases.items():
        with pytest.raises(DataError, match=message):
            prepare([str(good), bad], tmp_path / "out")
    with pytest.raises(DataError, match="need 2 or more"):
        prepare([str(_one_doc(tmp_path))], tmp_path / "out")
    with pytest.raises(DataError, match="tokenizer"):
        prepare([str(good)], tmp_path / "out", tokenizer="bpe:100")
    with pytest.raises(DataError, match="val_fraction"):
        prepare([str(good)], tmp_path / "out", val_fraction=1.5)
    assert not (tmp_path / "out").exists()


def _one_doc(folder):
    path = folder / "single.jsonl"
    path.write_text(json.dumps({"text": "only one"}) + "\n\n")
    return path


def test_crashed_prepare_leaves_nothing_loadable(tmp_path, monkeypatch):
    pattern = write_inputs(tmp_path, "jsonl", documents(10))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(preparing, "write_dataset", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([pattern], tmp_path / "out")
    with pytest.raises(DataError, match=str(tmp_path / "out")):
        load_dataset(tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    monkeypatch.undo()
    info = prepare([pattern], tmp_path / "out")
    monkeypatch.setattr(preparing, "write_dataset", crash)
    with pytest.raises(RuntimeError):
        prepare([pattern], tmp_path / "out", overwrite=True)
    assert load_dataset(tmp_path / "out").info == info  # a failed overwrite keeps the old dataset


def test_load_dataset_rejects_missing_and_corrupt(tmp_path, corpus):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: no such folder"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty' / 'meta.json'} is missing"):
        load_dataset(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (broken / name).write_bytes((corpus.info.path / name).read_bytes())
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="train.bin: expected 20000 uint16 tokens, found 100 bytes"):
        load_dataset(broken)
    (broken / "meta.json").write_text('{"format": 1, "dtype": "uint16"}')
    with pytest.raises(DataError, match="field 'vocab_size'"):
        load_dataset(broken)


# ---------------------------------------------------------------------------------------- synthetic

def test_synthetic_fingerprint_is_pinned(tmp_path):
    # Fingerprints are part of finished runs' identity: this value came from the code before the
    # data modules were split, and must never change (a new corpus needs a new writer, not an edit).
    info = synthetic(tmp_path / "x", tokens=50_000, seed=3)
    assert info.fingerprint == "63633fe34d706061"
    assert info.entropy_rate_nats == pytest.approx(2.2970007058214437, abs=1e-12)


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic(tmp_path / "a", tokens=30_000, seed=0)
    b = synthetic(tmp_path / "b", tokens=30_000, seed=0)
    c = synthetic(tmp_path / "c", tokens=30_000, seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.entropy_rate_nats == c.entropy_rate_nats  # the seed draws the sample, not the language
    assert (a.vocab_size, a.eos_id, a.tokenizer, a.bytes_per_token) == (512, 511, "synthetic", None)
    assert a.tokens == {"train": 30_000, "val": 65_536}
    with pytest.raises(DataError, match="already holds a dataset"):
        synthetic(tmp_path / "a", tokens=30_000)


@pytest.mark.parametrize("spec", [SyntheticSpec(), SyntheticSpec(content_tokens=40, topics=5, topic_vocab=10, support=3,
                                                                  stop_prob=0.2, language_seed=7)])
def test_entropy_rate_matches_the_true_model(spec, language):
    lang = language if spec == SyntheticSpec() else SyntheticLanguage(spec)
    stream = lang.sample(1_000_000, np.random.default_rng(11))
    nll = lang.token_nll(stream)
    assert np.isfinite(nll).all()
    # documents are i.i.d., so the ratio estimator's standard error comes from per-document sums
    starts = np.flatnonzero((stream >= lang.topic0) & (stream < lang.eos_id))
    per_doc, length = np.add.reduceat(nll, starts)[:-1], np.diff(starts)  # drop the cut-off last document
    estimate = per_doc.sum() / length.sum()
    stderr = np.std(per_doc - estimate * length) / math.sqrt(len(length)) / length.mean()
    rate = lang.entropy_rate()
    assert abs(estimate - rate) < 4 * stderr, (estimate, rate, stderr)
    assert rate < math.log(lang.vocab_size)
    if spec == SyntheticSpec():
        assert lang.vocab_size == 512 and 0.3 < rate / math.log(512) < 0.7
        counts = np.bincount(stream, minlength=512)
        assert counts[0] > counts[100] > counts[400] > 0  # Zipf-like token frequencies, every id used


# ---------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_module_does_not_import_data():
    tree = ast.parse(open(tokenizer_module.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {m for m in imported if m.startswith("pipeline")} == {"pipeline.errors"}
    code = "import sys, pipeline.data.tokenizer; print(sorted(m for m in sys.modules if m.startswith('pipeline.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['pipeline.data', 'pipeline.data.tokenizer', 'pipeline.errors']"  # the package is empty


@pytest.mark.parametrize("spec", ["byte", "bpe:300"])
def test_prepare_and_prompts_share_one_tokenizer(tmp_path, spec):
    pattern = write_inputs(tmp_path, "jsonl", documents(30))
    info = prepare([pattern], tmp_path / "out", tokenizer=spec)
    loaded = load_tokenizer(info.path)
    assert (loaded.kind, loaded.name) == ("byte" if spec == "byte" else "hf", spec)
    assert (loaded.vocab_size, loaded.eos_id) == (info.vocab_size, info.eos_id)
    # a document encodes to exactly the ids prepare wrote for it
    ids = load_dataset(info.path).read_split("train")
    first = ids[:np.flatnonzero(ids == info.eos_id)[0]]
    text = loaded.decode(first.tolist())
    assert np.array_equal(loaded.encode_batch([text])[0], first) and loaded.encode(text) == first.tolist()
    assert loaded.encode_prompt(text) == [info.eos_id, *first.tolist()]


def test_synthetic_prompts_are_ids(corpus):
    ids = load_tokenizer(corpus.info.path)
    assert (ids.kind, ids.name, ids.vocab_size, ids.eos_id) == ("ids", "synthetic", 512, 511)
    assert ids.encode_prompt("3 447 10") == [511, 3, 447, 10] and ids.decode([3, 447]) == "3 447"
    with pytest.raises(DataError, match="give token ids 0..511"):
        ids.encode("3 512")


def test_bad_tokenizer_specs(tmp_path):
    (tmp_path / "junk.json").write_text("{}")
    cases = {"bpe:100": "VOCAB must be an integer above 257", "bpe:x": "VOCAB must be",
             str(tmp_path / "missing.json"): "no such file", str(tmp_path / "junk.json"): "not a tokenizer.json",
             "gpt2": "must be 'byte', 'bpe:VOCAB' or an existing tokenizer.json"}
    for spec, message in cases.items():
        with pytest.raises(DataError, match=message):
            tokenizer_module.Tokenizer.from_spec(spec, iter(["a b"]))
