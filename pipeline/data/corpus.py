"""Documents from input files: .txt, .jsonl or .parquet, each plain, .gz or .zst, read as a stream.

A .txt file holds documents separated by blank lines (each stripped); a .jsonl file one JSON object per
line, the document in its text field; a .parquet file a string column of that name. Empty documents
are skipped. Records without the field (absent or null) are skipped and counted in a `Tally`, so the
caller can fail above a threshold; everything else that is wrong (a truncated or corrupt compressed
file, bytes that are not UTF-8, a line that is not a JSON object, a field that is not a string) fails
at once, naming the file and where in it.

Files are read in blocks cut at newlines, so memory stays bounded whatever the file's size (only one
document or JSON line must fit). The documents come out exactly as if each file were read whole.
This module imports nothing of the project but pipeline.errors, so tokenizing workers stay light.
"""
from __future__ import annotations

import glob
import gzip
import json
import re
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pipeline.errors import DataError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")
BLOCK_BYTES = 1 << 20                 # read size: the unit of bounded memory
_SEPARATOR = re.compile(r"\n\s*\n")   # a .txt document boundary: a blank line, whitespace allowed


@dataclass
class Tally:
    """What reading one file found: records (documents or JSON lines/rows), those without the field, documents."""
    records: int = 0
    missing: int = 0
    documents: int = 0
    characters: int = 0  # of the documents


def expand(inputs: list[str]) -> list[Path]:
    """The files that paths and glob patterns name, in order, each once; fails on anything unreadable by name."""
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
            file_format(path)
        files += matches
    return list(dict.fromkeys(files))  # a file named twice is read once


def file_format(path: Path) -> tuple[str, str]:
    """(format, compression) from the name, e.g. ("jsonl", "zst") for x.jsonl.zst; compression "" if none."""
    suffixes = path.suffixes[-2:]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    if not suffixes or suffixes[-1] not in FORMATS:
        raise DataError(f"inputs: {path}: unsupported file type {''.join(path.suffixes[-2:])!r} "
                        f"(use {', '.join(FORMATS)}, optionally with {' or '.join(COMPRESSIONS)})")
    return suffixes[-1][1:], compression[1:]


def documents(files: list[Path], text_field: str = "text", tallies: list[Tally] | None = None) -> Iterator[str]:
    """Every non-empty document of `files` in order; appends one Tally per file to `tallies` if given."""
    for path in files:
        tally = Tally()
        if tallies is not None:
            tallies.append(tally)
        kind, compression = file_format(path)
        with _open(path, compression) as stream:
            read = {"txt": _txt, "jsonl": _jsonl, "parquet": _parquet}[kind]
            for doc in read(stream, path, text_field, tally):
                if doc:
                    tally.documents += 1
                    tally.characters += len(doc)
                    yield doc


# --------------------------------------------------------------------------------------------- formats

def _txt(stream: BinaryIO, path: Path, field: str, tally: Tally) -> Iterator[str]:
    # A block's last piece may continue in the next block, so it is carried over. Blocks end at a
    # newline, and a boundary cut inside a blank-line run only adds empty pieces, which are skipped.
    carry = ""
    for text in _text_blocks(stream, path):
        pieces = _SEPARATOR.split(carry + text)
        carry = pieces.pop()
        yield from _stripped(pieces, tally)
    yield from _stripped([carry], tally)


def _stripped(pieces: list[str], tally: Tally) -> Iterator[str]:
    for piece in pieces:
        if doc := piece.strip():
            tally.records += 1
            yield doc


def _jsonl(stream: BinaryIO, path: Path, field: str, tally: Tally) -> Iterator[str]:
    number = 0
    for text in _text_blocks(stream, path):
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        for line in lines:
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise DataError(f"inputs: {path}:{number}: not a JSON object")
            tally.records += 1
            value = record.get(field)
            if value is None:
                tally.missing += 1
            elif isinstance(value, str):
                yield value
            else:
                raise DataError(f"inputs: {path}:{number}: field {field!r} is not a string: {value!r:.60}")


def _parquet(stream: BinaryIO, path: Path, field: str, tally: Tally) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(stream)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"inputs: {path}: not a readable parquet file ({err})") from None
    schema = table.schema_arrow
    if field not in schema.names:
        raise DataError(f"inputs: {path}: no column {field!r} (columns: {', '.join(schema.names)}); "
                        "choose one with --text-field")
    if schema.field(field).type not in (pa.string(), pa.large_string()):
        raise DataError(f"inputs: {path}: column {field!r} is {schema.field(field).type}, not a string")
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        column = batch.column(0)
        tally.records += len(column)
        tally.missing += column.null_count
        yield from (text for text in column.to_pylist() if text is not None)


def _text_blocks(stream: BinaryIO, path: Path) -> Iterator[str]:
    """Text blocks of the decoded stream, each cut just after a newline but the last (a decoding error names
    the byte offset of its block)."""
    offset, pending = 0, []
    while block := stream.read(BLOCK_BYTES):
        cut = block.rfind(b"\n") + 1
        if not cut:
            pending.append(block)  # no newline yet: a long line or document, read on
            continue
        raw = b"".join([*pending, block[:cut]])
        yield _decode(raw, path, offset)
        offset, pending = offset + len(raw), [block[cut:]]
    raw = b"".join(pending)
    if raw:
        yield _decode(raw, path, offset)


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"inputs: {path}: not UTF-8 at byte {offset + err.start} "
                        f"({raw[err.start:err.start + 4]!r}); convert it, e.g. with iconv") from None


# --------------------------------------------------------------------------------------------- compression

@contextmanager
def _open(path: Path, compression: str) -> Iterator[BinaryIO]:
    """The file's decompressed bytes as a stream with read(n); a .parquet.gz/.zst is decompressed to a
    temporary file first, since parquet needs to seek."""
    with open(path, "rb") as file:
        if not compression:
            yield file
            return
        reader = _Gzip(file, path) if compression == "gz" else _Zstd(file, path)
        if file_format(path)[0] != "parquet":
            yield reader
            return
        with tempfile.TemporaryFile() as temp:
            shutil.copyfileobj(reader, temp, BLOCK_BYTES)
            temp.seek(0)
            yield temp


class _Gzip:
    def __init__(self, file: BinaryIO, path: Path):
        self._gzip, self._path = gzip.GzipFile(fileobj=file), path

    def read(self, n: int) -> bytes:
        try:
            return self._gzip.read(n)
        except (EOFError, OSError, zlib.error) as err:  # truncated (EOFError), not gzip (BadGzipFile), corrupt
            raise DataError(f"inputs: {self._path}: truncated or corrupt gzip data ({err})") from None


class _Zstd:
    """Frame by frame, so a file cut short fails (zstandard's stream reader just stops) and
    concatenated frames, as `zstd` and `pzstd` write them, are read in full."""

    def __init__(self, file: BinaryIO, path: Path):
        import zstandard

        self._file, self._path, self._zstd = file, path, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()

    def read(self, n: int) -> bytes:
        while raw := self._file.read(n):
            out = []
            while raw:
                if self._frame.eof:
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                try:
                    out.append(self._frame.decompress(raw))
                except self._zstd.ZstdError as err:
                    raise DataError(f"inputs: {self._path}: corrupt or not zstd data ({err})") from None
                raw = self._frame.unused_data if self._frame.eof else b""
            if out := b"".join(out):
                return out
        if not self._frame.eof:
            raise DataError(f"inputs: {self._path}: truncated zstd data (the file ends inside a frame)")
        return b""
