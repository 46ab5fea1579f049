"""`isoflop data prepare` at scale: compressed inputs, parallel chunked tokenization, the manifest, bad input."""
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

import pipeline.data.prepare as preparing
from pipeline.data import corpus
from pipeline.data.dataset import load_dataset, write_dataset
from pipeline.data.prepare import prepare
from pipeline.errors import DataError

WORDS = "the cat dog sat on a mat ran far away quickly and then slept under old green tree café 猫 naïve".split()


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 60))) + f" doc{i}." for i in range(n)]


def mixed_inputs(folder) -> list[str]:
    """A .txt with every kind of blank-line separator, a .jsonl with blank lines, a .parquet with an empty text."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(300, 7)
    separators = ["\n\n", "\n \n\t\n", "\r\n\r\n", "\n\n\n\n", "\n  \n"]
    (folder / "a.txt").write_text("  " + "".join(d + separators[i % 5] for i, d in enumerate(docs[:100])))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + ("\n\n" if i % 7 == 0 else "\n")
                                            for i, d in enumerate(docs[100:200])))
    pq.write_table(pa.table({"text": docs[200:] + [""]}), folder / "c.parquet", row_group_size=37)
    return [str(folder / "a.txt"), str(folder / "*.jsonl"), str(folder / "c.parquet")]


# Fingerprints enter every run's identity: these came from the single-process writer that preceded the
# parallel one, and a folder prepared from the same inputs must keep them (and so the same token stream).
PINNED = {("byte", 0.01, 0): "0d3b64762e98f94d", ("byte", 0.2, 3): "f9e582d558ca1889",
          ("bpe:300", 0.01, 0): "b1e3c185db884c65", ("bpe:300", 0.2, 3): "2fe1b121e6944741"}


@pytest.mark.parametrize("tokenizer,val_fraction,seed", list(PINNED))
def test_fingerprints_are_pinned(tmp_path, tokenizer, val_fraction, seed):
    inputs = mixed_inputs(tmp_path / "in")
    info = prepare(inputs, tmp_path / "out", tokenizer=tokenizer, val_fraction=val_fraction, seed=seed)
    assert info.fingerprint == PINNED[tokenizer, val_fraction, seed]


def compress(path, kind: str) -> str:
    """Write path.gz or path.zst (the .zst in two frames, as pzstd writes) next to path; return its name."""
    raw = path.read_bytes()
    if kind == "gz":
        target = path.with_name(path.name + ".gz")
        target.write_bytes(gzip.compress(raw))
    else:
        target = path.with_name(path.name + ".zst")
        half = len(raw) // 2
        target.write_bytes(b"".join(zstandard.ZstdCompressor().compress(part) for part in (raw[:half], raw[half:])))
    return str(target)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_small_blocks_workers_shards_and_compression_keep_the_stream(tmp_path, monkeypatch, compression):
    # Reading in 64-byte blocks, batches of ~500 characters, 2 worker processes, 1000-token shards and
    # compressed inputs: the token stream, fingerprint and batches are those of the one-file writer.
    plain = mixed_inputs(tmp_path / "in")
    expected = prepare(plain, tmp_path / "plain", tokenizer="bpe:300", val_fraction=0.2, seed=3, jobs=1)
    assert expected.fingerprint == PINNED["bpe:300", 0.2, 3]
    packed = [compress(tmp_path / "in" / name, compression) for name in ("a.txt", "b.jsonl", "c.parquet")]
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 64)
    monkeypatch.setattr(preparing, "BATCH_CHARS", 500)
    info = prepare(packed, tmp_path / "sharded", tokenizer="bpe:300", val_fraction=0.2, seed=3, jobs=2,
                   shard_tokens=1000)
    assert info.fingerprint == expected.fingerprint and info.tokens == expected.tokens
    assert info.bytes_per_token == expected.bytes_per_token
    meta = json.loads((tmp_path / "sharded" / "meta.json").read_text())
    assert meta["format"] == 2 and [s["tokens"] for s in meta["shards"]["val"]] == [1000, 1000, 1000, 936]
    assert sorted(p.name for p in (tmp_path / "sharded").glob("*.bin"))[:2] == ["train-00000.bin", "train-00001.bin"]
    old, new = load_dataset(tmp_path / "plain"), load_dataset(tmp_path / "sharded")
    for split in ("train", "val"):
        assert np.array_equal(old.read_split(split), new.read_split(split))
    for step in range(0, 40, 7):  # blocks that straddle two shards read the same as from one file
        args = {"step": step, "rank": 0, "world_size": 1, "batch_size": 8, "seq_len": 63, "seed": 1}
        assert torch.equal(old.train_batch(**args), new.train_batch(**args))
    assert torch.equal(old.val_blocks(seq_len=63, max_blocks=50), new.val_blocks(seq_len=63, max_blocks=50))


def test_rerun_with_the_same_inputs_does_nothing(tmp_path):
    inputs = mixed_inputs(tmp_path / "in")
    said = []
    info = prepare(inputs, tmp_path / "out", jobs=1, progress=said.append)
    stamp = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    assert prepare(inputs, tmp_path / "out", jobs=1, progress=said.append) == info
    assert said[-1].endswith("is up to date with its inputs: nothing to do")
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns == stamp
    # an input changed since: not a rerun, and not overwritten unless asked
    with open(tmp_path / "in" / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare(inputs, tmp_path / "out", jobs=1)
    again = prepare(inputs, tmp_path / "out", jobs=1, overwrite=True)
    assert again.tokens["train"] + again.tokens["val"] > info.tokens["train"] + info.tokens["val"]


def test_a_crash_mid_way_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    inputs = mixed_inputs(tmp_path / "in")
    monkeypatch.setattr(preparing, "BATCH_CHARS", 500)
    written = []

    def crash_on_third_batch(self, ids):
        written.append(len(ids))
        if len(written) == 6:  # train and val of two batches written
            raise KeyboardInterrupt
        original(self, ids)

    original = preparing._Shards.write
    monkeypatch.setattr(preparing._Shards, "write", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, tmp_path / "out", jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no dataset, no staging folder
    monkeypatch.setattr(preparing._Shards, "write", original)
    assert prepare(inputs, tmp_path / "out", jobs=1).fingerprint == PINNED["byte", 0.01, 0]


# --------------------------------------------------------------------------------------------- bad input

def jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_file_fails_naming_it(tmp_path, kind):
    good = compress(Path(jsonl(tmp_path / "good.jsonl", [{"text": d} for d in documents(400, 1)])), kind)
    whole = Path(good).read_bytes()
    cut = tmp_path / f"cut.jsonl.{kind}"
    cut.write_bytes(whole[:len(whole) - 20])
    with pytest.raises(DataError, match=rf"^inputs: {cut}: truncated"):
        prepare([good, str(cut)], tmp_path / "out", jobs=1)
    junk = tmp_path / f"junk.jsonl.{kind}"
    junk.write_bytes(b"not compressed at all\n" * 10)
    with pytest.raises(DataError, match=rf"^inputs: {junk}: (corrupt|truncated)"):
        prepare([str(junk)], tmp_path / "out", jobs=1)
    assert not (tmp_path / "out").exists()


def test_records_without_the_text_field_are_counted(tmp_path):
    records = [{"content": d} for d in documents(300, 2)]
    for i in (5, 50):
        records[i] = {"title": "no content here"}
    records[80] = {"content": None}
    path = jsonl(tmp_path / "docs.jsonl", records)
    said = []
    info = prepare([path], tmp_path / "out", text_field="content", jobs=1, progress=said.append)
    assert "3 of 300 records (1.00%) have no field 'content'" in said[0]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["records"] == {"read": 300, "without_text_field": 3} and sum(meta["documents"].values()) == 297
    assert info.tokens["train"] + info.tokens["val"] == sum(len(r["content"].encode()) + 1 for r in records
                                                           if r.get("content"))
    records[120] = {"title": "a fourth"}
    path = jsonl(tmp_path / "docs.jsonl", records)
    with pytest.raises(DataError, match=r"^inputs: 4 of 300 records \(1.33%\) have no field 'content' "
                                        r".*docs.jsonl: 4\), above --max-missing 1.00%$"):
        prepare([path], tmp_path / "more", text_field="content", jobs=1)
    assert prepare([path], tmp_path / "more", text_field="content", jobs=1, max_missing=0.02).tokens


def test_a_text_field_no_record_has_fails_naming_file_and_field(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", [{"content": d} for d in documents(20, 3)])
    other = jsonl(tmp_path / "other.jsonl", [{"body": d} for d in documents(20, 4)])
    with pytest.raises(DataError, match=rf"^inputs: {other}: no record has the field 'content'; choose it with --text-field$"):
        prepare([good, other], tmp_path / "out", text_field="content", jobs=1)
    pq.write_table(pa.table({"body": documents(5, 5)}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no column 'content' \(columns: body\)"):
        prepare([good, str(tmp_path / "t.parquet")], tmp_path / "out", text_field="content", jobs=1)
    wrong = jsonl(tmp_path / "wrong.jsonl", [{"content": "fine"}, {"content": 42}])
    with pytest.raises(DataError, match=rf"^inputs: {wrong}:2: field 'content' is not a string: 42$"):
        prepare([good, wrong], tmp_path / "out", text_field="content", jobs=1)
    assert not (tmp_path / "out").exists()


def test_cli_prepares_a_compressed_glob_with_bpe(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    docs = documents(200, 6)
    for i in range(3):
        compress(Path(jsonl(folder / f"part{i}.jsonl", [{"content": d, "i": j} for j, d in enumerate(docs[i::3])])), "zst")
    command = [sys.executable, "-m", "pipeline.cli", "data", "prepare", str(folder / "*.jsonl.zst"),
               "--text-field", "content", "--tokenizer", "bpe:300", "--out", str(tmp_path / "out"), "--jobs", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    info = load_dataset(tmp_path / "out").info
    assert f"fingerprint {info.fingerprint}" in proc.stdout and info.tokenizer == "bpe:300"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    bad = subprocess.run(command[:-4] + ["--text-field", "body", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no record has the field 'body'" in bad.stderr


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 20])
def test_txt_read_in_blocks_splits_as_if_read_whole(tmp_path, monkeypatch, block_bytes):
    # Documents span lines and blocks; separators mix spaces, tabs, CRs and non-ASCII whitespace.
    rng = np.random.default_rng(8)
    pieces = ["line one\nline two", "  indented\n\tand tabbed  ", "café\r\nnaïve", "猫\u2028猫", "x"]
    separators = ["\n\n", "\n \n", "\n\u00a0\n\n", "\r\n\r\n", "\n\t \n \n", "\n"]  # a lone "\n" joins documents
    text = "".join(pieces[i % 5] + separators[int(rng.integers(6))] for i in range(200))
    (tmp_path / "a.txt").write_bytes(text.encode())
    monkeypatch.setattr(corpus, "BLOCK_BYTES", block_bytes)
    whole = [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]  # how the file was read before
    assert list(corpus.documents([tmp_path / "a.txt"])) == whole


def test_long_passes_report_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(preparing, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(preparing, "BATCH_CHARS", 2000)
    said = []
    prepare(mixed_inputs(tmp_path / "in"), tmp_path / "out", jobs=1, progress=said.append)
    tokenized = [line for line in said if line.startswith("tokenized")]
    assert len(tokenized) > 5 and all(re.fullmatch(r"tokenized [\d,]+ tokens, [\d,]+ tokens/s; reading file [123] of 3",
                                                   line) for line in tokenized)
    assert tokenized[-1].endswith("file 3 of 3")


def test_a_bad_tokenizer_fails_before_reading_any_input(tmp_path, monkeypatch):
    inputs = mixed_inputs(tmp_path / "in")

    def no_reading(*args, **kwargs):
        raise AssertionError("read the inputs")

    monkeypatch.setattr(preparing, "documents", no_reading)
    for spec, message in {"bpe:100": "VOCAB must be an integer above 257", "gpt2": "must be 'byte', 'bpe:VOCAB'",
                          str(tmp_path / "none.json"): "no such file"}.items():
        with pytest.raises(DataError, match=message):
            prepare(inputs, tmp_path / "out", tokenizer=spec)


def test_a_folder_in_the_old_one_file_layout_reads_the_same(tmp_path, monkeypatch):
    # The layout before sharding: train.bin / val.bin and a format-1 meta.json without a shard list.
    inputs = mixed_inputs(tmp_path / "in")
    sharded = prepare(inputs, tmp_path / "new", tokenizer="bpe:300", jobs=1, shard_tokens=2000)
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    for split in ("train", "val"):
        with open(old / f"{split}.bin", "wb") as f:
            f.writelines((tmp_path / "new" / shard["file"]).read_bytes() for shard in meta["shards"][split])
    (old / "tokenizer.json").write_bytes((tmp_path / "new" / "tokenizer.json").read_bytes())
    write_dataset(old, meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["tokens"], {})
    assert json.loads((old / "meta.json").read_text())["format"] == 1
    a, b = load_dataset(old), load_dataset(tmp_path / "new")
    assert a.info.fingerprint == sharded.fingerprint == PINNED["bpe:300", 0.01, 0] and len(meta["shards"]["train"]) > 5
    for step in range(0, 30, 3):
        args = {"step": step, "rank": 0, "world_size": 1, "batch_size": 4, "seq_len": 100, "seed": 2}
        assert torch.equal(a.train_batch(**args), b.train_batch(**args))
