"""Prepare real text: read documents from input files, tokenize them over all cores, write a dataset.

Three streaming passes over the inputs: one counts the documents and checks every record (so bad input
fails before any compute, and the validation documents can be drawn), one trains the BPE if asked to,
one tokenizes, in batches spread over worker processes, into shard files. The folder is built under a
hidden name and renamed into place only when meta.json, the manifest, is written: a crash leaves nothing
that looks complete. The manifest records the inputs (path, size, mtime) and every option that shapes
the tokens, so a rerun with the same inputs and options finds it and does nothing.

Reading files lives in pipeline.data.corpus, the worker pool in pipeline.data.encode_pool, the folder format in
pipeline.data.dataset and the tokenizer in pipeline.data.tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.data.corpus import Tally, documents, expand
from pipeline.data.dataset import (META, SHARD_TOKENS, SPLITS, DatasetInfo, check_target, load_dataset, staged,
                                   token_dtype, write_dataset)
from pipeline.data.encode_pool import Encoded, encode_all
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import DataError

BATCH_CHARS = 1 << 21   # characters of text per batch a worker encodes (bounds memory per batch)
BATCH_DOCS = 1024       # and documents per batch
PROGRESS_SECONDS = 10.0


def prepare(inputs: list[str], out: str | Path, *, tokenizer: str = "byte", val_fraction: float = 0.01,
            seed: int = 0, text_field: str = "text", max_missing: float = 0.01, jobs: int | None = None,
            overwrite: bool = False, shard_tokens: int = SHARD_TOKENS,
            progress: Callable[[str], None] | None = None) -> DatasetInfo:
    """Tokenize documents into a dataset folder, holding out a seeded `val_fraction` of the documents.

    Inputs are files or globs: .txt (documents separated by blank lines, each stripped), .jsonl (the
    string `text_field` of each line's object) or .parquet (a string column `text_field`), each plain,
    .gz or .zst; empty documents are skipped. Records without the field are skipped and counted; more
    than `max_missing` of all records without it fails, as does a file where none has it. Input that
    is not valid UTF-8, or a compressed file cut short, fails naming the file. `jobs` worker processes
    tokenize (default: one per core; they are spawned, so a script calling this with more than one
    needs the usual `if __name__ == "__main__":` guard). `progress` receives one-line reports of long work.
    """
    say = progress or (lambda line: None)
    out = Path(out)
    jobs = available_cores() if jobs is None else jobs
    _check_options(tokenizer, val_fraction, seed, text_field, max_missing, jobs, shard_tokens)
    files = expand(inputs)
    source = _source(files, tokenizer, text_field, val_fraction, seed)
    if not overwrite and _recorded_source(out) == source:
        say(f"{out} is up to date with its inputs: nothing to do")
        return load_dataset(out).info
    check_target(out, overwrite)
    tallies = _count(files, text_field, max_missing, _Progress(say, len(files)))
    n_docs = sum(t.documents for t in tallies)
    if n_docs < 2:
        raise DataError(f"inputs: {', '.join(map(str, files))} hold {n_docs} document; need 2 or more "
                        "to hold out validation documents")
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    val_docs = np.sort(np.random.default_rng(seed).choice(n_docs, n_val, replace=False))

    with staged(out, overwrite) as folder:
        if tokenizer.startswith("bpe:"):
            say(f"training {tokenizer} on {n_docs:,} documents")
        codec = Tokenizer.from_spec(tokenizer, documents(files, text_field))  # reads documents only to train BPE
        codec.save(folder)  # before write_dataset, which fingerprints tokenizer.json with the tokens
        progress = _Progress(say, len(files))
        batches = _batches(documents(files, text_field, progress.files), val_docs, n_docs)
        n_batches = 1 + max(sum(t.characters for t in tallies) // BATCH_CHARS, n_docs // BATCH_DOCS)
        if codec.kind == "byte" or n_batches == 1:
            jobs = 1  # encoding bytes, or a single batch, costs less than starting workers and sending them text
        dtype = token_dtype(codec.vocab_size)
        shards, val_bytes = _write_shards(folder, encode_all(codec, batches, dtype, jobs), shard_tokens, progress)
        counts = {split: sum(n for _, n in shards[split]) for split in SPLITS}
        write_dataset(folder, codec.name, codec.vocab_size, codec.eos_id, counts,
                      {"bytes_per_token": val_bytes / counts["val"], "val_fraction": val_fraction, "seed": seed,
                       "documents": {"train": n_docs - n_val, "val": n_val},
                       "records": {"read": sum(t.records for t in tallies),
                                   "without_text_field": sum(t.missing for t in tallies)},
                       "source": source}, shards=shards)
    return load_dataset(out).info


def _check_options(tokenizer: str, val_fraction: float, seed: int, text_field: str, max_missing: float, jobs: int,
                   shard_tokens: int) -> None:
    """Each bad option named with its value, before any input is read."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction: must be between 0 and 1 exclusive, got {val_fraction}")
    if seed < 0:
        raise DataError(f"seed: must be non-negative, got {seed}")
    if not 0 <= max_missing < 1:
        raise DataError(f"max_missing: must be a fraction in [0, 1), got {max_missing}")
    if not text_field:
        raise DataError("text_field: must be a field name, got ''")
    if jobs < 1 or shard_tokens < 1:
        raise DataError(f"jobs, shard_tokens: must be positive, got jobs={jobs} shard_tokens={shard_tokens}")
    Tokenizer.check_spec(tokenizer)


def _count(files: list[Path], text_field: str, max_missing: float, progress: _Progress) -> list[Tally]:
    """The first pass: every record read and checked, documents and records without the field counted."""
    tallies, say = progress.files, progress.say
    for n, _ in enumerate(documents(files, text_field, tallies), 1):
        if n % 10_000 == 0:
            progress.report(f"counted {n:,} documents")
    for path, tally in zip(files, tallies):
        if tally.records and tally.missing == tally.records:
            raise DataError(f"inputs: {path}: no record has the field {text_field!r}; choose it with --text-field")
        if tally.documents == 0:
            raise DataError(f"inputs: {path}: empty (no documents)")
    records, missing = sum(t.records for t in tallies), sum(t.missing for t in tallies)
    if missing:
        worst = max(zip(files, tallies), key=lambda pair: pair[1].missing)
        line = (f"{missing:,} of {records:,} records ({missing / records:.2%}) have no field {text_field!r} "
                f"(most in {worst[0]}: {worst[1].missing:,})")
        if missing > max_missing * records:
            raise DataError(f"inputs: {line}, above --max-missing {max_missing:.2%}")
        say(f"{line}; skipping them")
    return tallies


def _batches(docs: Iterator[str], val_docs: np.ndarray, n_docs: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Documents in batches of bounded size, each with the mask of its validation documents."""
    first = 0
    while True:
        batch, chars = [], 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                break
        if not batch:
            break
        is_val = np.zeros(len(batch), dtype=bool)
        lo, hi = np.searchsorted(val_docs, [first, first + len(batch)])
        is_val[val_docs[lo:hi] - first] = True
        first += len(batch)
        yield batch, is_val
    if first != n_docs:
        raise DataError(f"inputs: changed while being prepared ({n_docs:,} documents counted, then {first:,} read)")


def _write_shards(folder: Path, encoded: Iterator[Encoded], shard_tokens: int,
                  progress: _Progress) -> tuple[dict[str, list[tuple[str, int]]], int]:
    """Write the batches' ids in order; return each split's (shard file, tokens) list and the val split's bytes."""
    shards = {split: _Shards(folder, split, shard_tokens) for split in SPLITS}
    val_bytes, tokens = 0, 0
    try:
        for batch in encoded:
            shards["train"].write(batch.train)
            shards["val"].write(batch.val)
            val_bytes += batch.val_bytes
            tokens += len(batch.train) + len(batch.val)
            progress.report(f"tokenized {tokens:,} tokens", tokens)
    finally:
        for split in SPLITS:
            shards[split].close()
    return {split: shards[split].listed for split in SPLITS}, val_bytes


class _Progress:
    """A line every PROGRESS_SECONDS while a pass runs: its count, rate and the file being read."""

    def __init__(self, say: Callable[[str], None], n_files: int):
        self.say, self.n_files, self.files = say, n_files, []  # files: a Tally per file started
        self._start = self._last = time.monotonic()

    def report(self, done: str, tokens: int | None = None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_SECONDS:
            return
        self._last = now
        rate = f", {tokens / (now - self._start):,.0f} tokens/s" if tokens is not None else ""
        self.say(f"{done}{rate}; reading file {len(self.files)} of {self.n_files}")


class _Shards:
    """One split's shard files: ids appended in order, a new file every `limit` tokens."""

    def __init__(self, folder: Path, split: str, limit: int):
        self.folder, self.split, self.limit = folder, split, limit
        self.listed: list[tuple[str, int]] = []  # (file name, tokens)
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if not self.listed or self.listed[-1][1] == self.limit:
                self.close()
                name = f"{self.split}-{len(self.listed):05d}.bin"
                self._file, self.listed = open(self.folder / name, "wb"), [*self.listed, (name, 0)]  # noqa: SIM115
            name, n = self.listed[-1]
            part, ids = ids[:self.limit - n], ids[self.limit - n:]
            self._file.write(part.tobytes())
            self.listed[-1] = (name, n + len(part))

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def available_cores() -> int:
    """The cores this process may run on (fewer than the machine's under a container's or scheduler's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _source(files: list[Path], tokenizer: str, text_field: str, val_fraction: float, seed: int) -> dict:
    """What the tokens are a function of, as the manifest records it to recognise a rerun."""
    stats = [(path.resolve(), path.stat()) for path in files]
    spec = {"tokenizer": tokenizer}
    if tokenizer.endswith(".json") and Path(tokenizer).is_file():
        spec["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    return {"inputs": [{"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns} for path, st in stats],
            **spec, "text_field": text_field, "val_fraction": val_fraction, "seed": seed}


def _recorded_source(out: Path) -> dict | None:
    try:
        return json.loads((out / META).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None

