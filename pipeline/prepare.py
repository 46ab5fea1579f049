"""Prepare real text: read documents from .txt/.jsonl/.parquet files, tokenize them, write a dataset.

The folder format, and the staging and fingerprinting every writer shares, live in pipeline.data;
the tokenizer (bytes, a BPE trained here, or a given tokenizer.json) in pipeline.tokenizer.
"""
from __future__ import annotations

import glob
import itertools
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import SPLITS, DatasetInfo, check_target, load_dataset, staged, token_dtype, write_dataset
from pipeline.errors import DataError
from pipeline.tokenizer import Tokenizer

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def prepare(inputs: list[str], out: str | Path, *, tokenizer: str = "byte", val_fraction: float = 0.01,
            seed: int = 0, overwrite: bool = False) -> DatasetInfo:
    """Tokenize documents into a dataset folder, holding out a seeded `val_fraction` of the documents.

    Inputs are files or globs: .txt (documents separated by one or more blank lines, each stripped),
    .jsonl (a "text" string per line) or .parquet (a "text" column); empty documents are skipped.
    Input that is not valid UTF-8 fails, naming the file and byte offset: no document is silently lost.
    """
    out = Path(out)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction: must be between 0 and 1 exclusive, got {val_fraction}")
    if seed < 0:
        raise DataError(f"seed: must be non-negative, got {seed}")
    files = _expand(inputs)
    check_target(out, overwrite)
    n_docs = sum(1 for _ in _documents(files))  # a first pass that also validates every file
    if n_docs < 2:
        raise DataError(f"inputs: {', '.join(map(str, files))} hold {n_docs} document; need 2 or more "
                        "to hold out validation documents")
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_docs, n_val, replace=False)] = True

    with staged(out, overwrite) as folder:
        codec = Tokenizer.from_spec(tokenizer, _documents(files))  # reads the documents only to train BPE
        codec.save(folder)  # before write_dataset, which fingerprints tokenizer.json with the tokens
        counts, val_bytes = _write_splits(folder, files, is_val, codec)
        write_dataset(folder, codec.name, codec.vocab_size, codec.eos_id, counts,
                      {"bytes_per_token": val_bytes / counts["val"], "val_fraction": val_fraction, "seed": seed,
                       "documents": {"train": n_docs - n_val, "val": n_val}, "inputs": [str(f) for f in files]})
    return load_dataset(out).info


def _write_splits(folder: Path, files: list[Path], is_val: np.ndarray,
                  codec: Tokenizer) -> tuple[dict[str, int], int]:
    """Append each document's ids and EOS to its split's file; return token counts and the val split's bytes."""
    dtype = token_dtype(codec.vocab_size)
    counts, val_bytes = {s: 0 for s in SPLITS}, 0
    with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val:
        shard, numbered = {"train": train, "val": val}, enumerate(_documents(files))
        while batch := list(itertools.islice(numbered, 1024)):  # batches let a HF tokenizer encode in parallel
            for (i, doc), ids in zip(batch, codec.encode_batch([doc for _, doc in batch])):
                split = "val" if is_val[i] else "train"
                shard[split].write(np.append(ids, codec.eos_id).astype(dtype).tobytes())
                counts[split] += len(ids) + 1
                val_bytes += len(doc.encode()) if is_val[i] else 0
    return counts, val_bytes


def _expand(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"inputs: no file matches {item}")
        elif Path(item).is_file():
            matches = [Path(item)]
        else:
            raise DataError(f"inputs: {item}: no such file" + (" (a folder: pass a glob like DIR/*.txt)"
                                                                if Path(item).is_dir() else ""))
        for path in matches:
            if path.suffix not in INPUT_SUFFIXES:
                raise DataError(f"inputs: {path}: unsupported file type {path.suffix!r} (use {', '.join(INPUT_SUFFIXES)})")
        files += matches
    return list(dict.fromkeys(files))  # a file named twice is read once


def _documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        n = 0
        for doc in {".txt": _txt, ".jsonl": _jsonl, ".parquet": _parquet}[path.suffix](path):
            if doc:
                n += 1
                yield doc
        if n == 0:
            raise DataError(f"inputs: {path}: empty (no documents)")


def _decode(raw: bytes, path: Path, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"inputs: {path}: not UTF-8 at byte {offset + err.start} "
                        f"({raw[err.start:err.start + 4]!r}); convert it, e.g. with iconv") from None


def _txt(path: Path) -> Iterator[str]:
    for doc in re.split(r"\n\s*\n", _decode(path.read_bytes(), path)):
        yield doc.strip()


def _jsonl(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decode(raw, path, offset).strip()
            offset += len(raw)
            if not line:
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise DataError(f"inputs: {path}:{number}: not a JSON object") from None
            if not isinstance(text, str):
                raise DataError(f"inputs: {path}:{number}: field 'text' is missing or not a string: {text!r}")
            yield text


def _parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"inputs: {path}: not a readable parquet file ({err})") from None
    column = table.schema_arrow.field("text").type if "text" in table.schema_arrow.names else None
    if column not in (pa.string(), pa.large_string()):
        raise DataError(f"inputs: {path}: needs a string column 'text' (found {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=["text"]):
        yield from (text or "" for text in batch.column(0).to_pylist())
