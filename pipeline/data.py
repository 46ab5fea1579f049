"""Token data on disk: prepare a corpus, generate the synthetic one, and read batches from either.

A dataset is a folder holding `train.bin` and `val.bin` (raw uint16 or uint32 token ids, documents
packed and each followed by EOS), `meta.json`, and `tokenizer.json` when a Hugging Face tokenizer
made it. Folders are built under a hidden sibling name and renamed into place when complete, so a
folder with a `meta.json` is always a finished one.

Batches are pure functions of (seed, step, rank, world_size, batch_size, seq_len): the train split is
cut into non-overlapping blocks of seq_len + 1 tokens, visited in a seeded permutation per epoch, and
global batch `step` takes the next batch_size * world_size blocks of that single stream, rank r taking
the r-th slice. So 2 ranks of batch b read exactly what 1 rank of batch 2b reads, and a resumed run
reads exactly the batches it would have read.

The synthetic corpus (see docs/synthetic_corpus.md) has a known entropy rate to compare fits against.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

EOS = "<|endoftext|>"  # the end-of-document token's text; its id is recorded per dataset as eos_id
BYTE_VOCAB = 257       # "byte" tokenizer: ids 0..255 are UTF-8 bytes, 256 is EOS
META = "meta.json"
FORMAT = 1
SPLITS = ("train", "val")
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>")  # what an existing tokenizer may call its EOS


class DataError(ValueError):
    """A user-facing data problem: one line naming the file or field and the bad value."""


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    vocab_size: int                   # real token ids; the MDM's mask id (= vocab_size) is not one of them
    eos_id: int
    tokenizer: str                    # "byte", "bpe:VOCAB", "synthetic", or the tokenizer.json it came from
    fingerprint: str                  # sha256 of tokenizer + token files (16 hex digits)
    tokens: dict[str, int]            # {"train": n, "val": n}
    entropy_rate_nats: float | None   # the synthetic corpus's exact entropy rate; None for real text
    bytes_per_token: float | None     # UTF-8 bytes per token of the val split (for bits/byte); None if synthetic


# --------------------------------------------------------------------------------------------- reading

class TokenDataset:
    """A prepared folder opened as memmaps; every read is a pure function of its arguments."""

    def __init__(self, info: DatasetInfo, dtype: np.dtype):
        self.info = info
        self._split = {s: np.memmap(info.path / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS}

    def num_train_blocks(self, seq_len: int) -> int:
        return len(self._split["train"]) // (seq_len + 1)

    def train_batch(self, *, step: int, rank: int, world_size: int, batch_size: int, seq_len: int,
                    seed: int) -> torch.LongTensor:
        """Rank `rank`'s [batch_size, seq_len + 1] share of global batch `step`."""
        if not (0 <= rank < world_size and batch_size > 0 and seq_len > 0 and step >= 0 and seed >= 0):
            raise DataError(f"train_batch: bad arguments step={step} rank={rank} world_size={world_size} "
                            f"batch_size={batch_size} seq_len={seq_len} seed={seed}")
        n_blocks = self.num_train_blocks(seq_len)
        if n_blocks < 1:
            raise DataError(f"data: {self.info.path} has no training block of seq_len+1={seq_len + 1} tokens")
        first = (step * world_size + rank) * batch_size  # position in the endless stream of blocks
        epoch, offset = np.divmod(np.arange(first, first + batch_size), n_blocks)
        blocks = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            blocks[here] = _epoch_order(seed, int(e), n_blocks)[offset[here]]
        return self._blocks("train", blocks, seq_len)

    def val_blocks(self, *, seq_len: int, max_blocks: int) -> torch.LongTensor:
        """Up to max_blocks fixed blocks spread evenly over the val split; no seed involved."""
        available = len(self._split["val"]) // (seq_len + 1)
        if max_blocks < 1:
            raise DataError(f"val_blocks: max_blocks must be positive, got {max_blocks}")
        if available < 1:
            raise DataError(f"data: {self.info.path} val split has {self.info.tokens['val']} tokens, "
                            f"fewer than one block of seq_len+1={seq_len + 1}")
        n = min(max_blocks, available)
        return self._blocks("val", np.arange(n) * available // n, seq_len)

    def _blocks(self, split: str, blocks: np.ndarray, seq_len: int) -> torch.LongTensor:
        width = seq_len + 1
        index = blocks[:, None] * width + np.arange(width)  # memmap fancy indexing reads only these pages
        return torch.from_numpy(np.array(self._split[split][index], dtype=np.int64))


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_blocks: int) -> np.ndarray:
    """The block order of one epoch; cached only to save time, so batches stay pure."""
    order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    order.flags.writeable = False
    return order


def load_dataset(path: str | Path) -> TokenDataset:
    """Open a dataset folder after checking its metadata and that each token file has its full size."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"data: {path}: no such folder")
    meta_file = path / META
    if not meta_file.is_file():
        raise DataError(f"data: {meta_file} is missing (not a dataset folder, or one still being written)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"data: {meta_file}: unreadable ({err})") from None

    def field(name: str, kind: type | tuple[type, ...]):
        value = meta.get(name) if isinstance(meta, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"data: {meta_file}: field {name!r} is missing or not {getattr(kind, '__name__', kind)}: {value!r}")
        return value

    if field("format", int) != FORMAT:
        raise DataError(f"data: {meta_file}: format {meta['format']} is not {FORMAT}; prepare it again")
    dtype = field("dtype", str)
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"data: {meta_file}: dtype must be uint16 or uint32, got {dtype!r}")
    vocab_size, eos_id, tokens = field("vocab_size", int), field("eos_id", int), field("tokens", dict)
    if not 0 <= eos_id < vocab_size <= np.iinfo(dtype).max + 1:
        raise DataError(f"data: {meta_file}: eos_id={eos_id} / vocab_size={vocab_size} do not fit {dtype}")
    for split in SPLITS:
        n = tokens.get(split)
        if not isinstance(n, int) or n < 1:
            raise DataError(f"data: {meta_file}: tokens.{split} must be a positive integer, got {n!r}")
        shard = path / f"{split}.bin"
        size = shard.stat().st_size if shard.is_file() else None
        if size != n * np.dtype(dtype).itemsize:
            raise DataError(f"data: {shard}: expected {n} {dtype} tokens, found "
                            f"{'no file' if size is None else f'{size} bytes'} (corrupt or incomplete)")
    optional = {name: meta.get(name) for name in ("entropy_rate_nats", "bytes_per_token")}
    for name, value in optional.items():
        if value is not None and not isinstance(value, (int, float)):
            raise DataError(f"data: {meta_file}: field {name!r} must be a number or null, got {value!r}")
    info = DatasetInfo(path=path, vocab_size=vocab_size, eos_id=eos_id, tokenizer=field("tokenizer", str),
                       fingerprint=field("fingerprint", str), tokens={s: tokens[s] for s in SPLITS}, **optional)
    return TokenDataset(info, np.dtype(dtype))


# --------------------------------------------------------------------------------------------- writing

@contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden sibling folder to build in; rename it to `out` only if the block finishes."""
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        _check_target(out, overwrite)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "data")
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    is_dataset = (out / META).is_file()
    if not out.is_dir() or (not is_dataset and any(out.iterdir())):
        raise DataError(f"data: {out} exists and is not a dataset folder; refusing to write there")
    if is_dataset and not overwrite:
        raise DataError(f"data: {out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")


def _write_dataset(folder: Path, tokenizer: str, vocab_size: int, eos_id: int, tokens: dict[str, int],
                   extra: dict) -> None:
    """Fingerprint the token files already in `folder` and write meta.json (last, so it marks completion)."""
    digest = hashlib.sha256()
    tokenizer_json = folder / "tokenizer.json"
    digest.update(tokenizer_json.read_bytes() if tokenizer_json.exists() else tokenizer.encode())
    for split in SPLITS:
        with open(folder / f"{split}.bin", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    meta = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": vocab_size, "eos_id": eos_id,
            "dtype": _dtype(vocab_size).name, "tokens": tokens, "fingerprint": digest.hexdigest()[:16],
            "entropy_rate_nats": None, "bytes_per_token": None, **extra}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ------------------------------------------------------------------------------- real text: prepare()

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
    _check_target(out, overwrite)
    n_docs = sum(1 for _ in _documents(files))  # a first pass that also validates every file
    if n_docs < 2:
        raise DataError(f"inputs: {', '.join(map(str, files))} hold {n_docs} document; need 2 or more "
                        "to hold out validation documents")
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_docs, n_val, replace=False)] = True

    with _staged(out, overwrite) as folder:
        codec = _Codec.make(tokenizer, files, folder)
        dtype = _dtype(codec.vocab_size)
        counts, val_bytes = {s: 0 for s in SPLITS}, 0
        with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val:
            shard, numbered = {"train": train, "val": val}, enumerate(_documents(files))
            while batch := list(itertools.islice(numbered, 1024)):
                for (i, doc), ids in zip(batch, codec.encode([doc for _, doc in batch])):
                    split = "val" if is_val[i] else "train"
                    shard[split].write(np.append(ids, codec.eos_id).astype(dtype).tobytes())
                    counts[split] += len(ids) + 1
                    val_bytes += len(doc.encode()) if is_val[i] else 0
        _write_dataset(folder, codec.name, codec.vocab_size, codec.eos_id, counts,
                       {"bytes_per_token": val_bytes / counts["val"], "val_fraction": val_fraction, "seed": seed,
                        "documents": {"train": n_docs - n_val, "val": n_val}, "inputs": [str(f) for f in files]})
    return load_dataset(out).info


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


@dataclass(frozen=True)
class _Codec:
    """UTF-8 bytes, or a Hugging Face tokenizer (trained here or loaded), with an EOS id."""
    name: str
    vocab_size: int
    eos_id: int
    hf: object | None = None  # tokenizers.Tokenizer; None means bytes

    @classmethod
    def make(cls, spec: str, files: list[Path], folder: Path) -> _Codec:
        if spec == "byte":
            return cls("byte", BYTE_VOCAB, BYTE_VOCAB - 1)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if spec.startswith("bpe:"):
            vocab = spec[4:]
            if not vocab.isdigit() or int(vocab) <= BYTE_VOCAB:
                raise DataError(f"tokenizer: {spec!r}: VOCAB must be an integer above {BYTE_VOCAB} "
                                "(256 byte symbols + EOS)")
            hf = Tokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            hf.train_from_iterator(_documents(files), trainers.BpeTrainer(
                vocab_size=int(vocab), special_tokens=[EOS], show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        elif spec.endswith(".json"):
            if not Path(spec).is_file():
                raise DataError(f"tokenizer: {spec}: no such file")
            try:
                hf = Tokenizer.from_file(spec)
            except Exception as err:  # tokenizers raises its own exception types
                raise DataError(f"tokenizer: {spec}: not a tokenizer.json ({err})") from None
            if not any(hf.token_to_id(name) is not None for name in EOS_NAMES):
                hf.add_special_tokens([EOS])  # give it an EOS; the saved copy records it
        else:
            raise DataError(f"tokenizer: must be 'byte', 'bpe:VOCAB' or an existing tokenizer.json, got {spec!r}")
        hf.save(str(folder / "tokenizer.json"))
        eos_id = next(hf.token_to_id(name) for name in EOS_NAMES if hf.token_to_id(name) is not None)
        return cls(spec, hf.get_vocab_size(), eos_id, hf)

    def encode(self, docs: list[str]) -> list[np.ndarray]:
        if self.hf is None:
            return [np.frombuffer(doc.encode(), dtype=np.uint8) for doc in docs]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(docs, add_special_tokens=False)]


# ---------------------------------------------------------------------------- the synthetic corpus

@dataclass(frozen=True)
class SyntheticSpec:
    """The synthetic language. Its tables come from `language_seed`, so every sample seed shares them."""
    content_tokens: int = 447      # ids 0..446, Zipf-frequent: id 0 most common
    topics: int = 64               # ids 447..510 are topic tokens; 511 is EOS: vocab 512
    topic_vocab: int = 32          # content tokens a topic's own table draws from
    support: int = 8               # next-token candidates per (topic, state) row, and per shared row
    shared_weight: float = 0.25    # chance a step follows the topic-independent table instead
    stop_prob: float = 1 / 64      # chance of EOS before each content token: mean 65 tokens a document
    vocab_zipf: float = 1.0        # exponent of the content-token frequencies the supports are drawn from
    topic_zipf: float = 1.0        # exponent of the topic prior
    support_zipf: float = 1.0      # exponent of the weights over a row's candidates
    language_seed: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.support <= self.topic_vocab <= self.content_tokens and self.topics >= 1
                and 0 < self.stop_prob < 1 and 0 <= self.shared_weight <= 1):
            raise DataError(f"synthetic spec: need 1 <= support <= topic_vocab <= content_tokens, topics >= 1, "
                            f"0 < stop_prob < 1 and 0 <= shared_weight <= 1; got {self}")


class SyntheticLanguage:
    """Documents: a topic token k ~ Zipf prior, then a first-order Markov chain over content tokens
    that belongs to topic k, stopping with prob q before each token (then EOS).

    The state (topic, previous token) is visible in the stream, so the true next-token probability
    given all previous tokens is the table entry itself; that keeps the entropy rate exact.
    Transition rows are stored sparse, sorted by (row, next token); row = topic * (C + 1) + state,
    where state C means "just after the topic token".
    """

    def __init__(self, spec: SyntheticSpec = SyntheticSpec()):
        self.spec = spec
        C, K, S = spec.content_tokens, spec.topics, spec.support
        self.topic0, self.eos_id, self.vocab_size = C, C + K, C + K + 1
        rng = np.random.default_rng(spec.language_seed)
        self.prior = _zipf(K, spec.topic_zipf)
        rank_weight = _zipf(S, spec.support_zipf)
        n_rows = K * (C + 1)

        def race(allowed: np.ndarray, n: int) -> np.ndarray:
            # n distinct allowed ids per row, in the order of sampling without replacement by frequency:
            # an exponential race (the first of independent Exp(rate = frequency) clocks to ring wins).
            ring = rng.standard_exponential(allowed.shape, dtype=np.float32) / frequency
            ring[~allowed] = np.inf
            first = np.argpartition(ring, n - 1, axis=1)[:, :n]
            return np.take_along_axis(first, np.argsort(np.take_along_axis(ring, first, 1), axis=1), 1)

        frequency = _zipf(C, spec.vocab_zipf).astype(np.float32)
        topic_vocab = np.zeros((K, C), dtype=bool)
        np.put_along_axis(topic_vocab, race(np.ones((K, C), dtype=bool), spec.topic_vocab), True, axis=1)
        topical = race(np.repeat(topic_vocab, C + 1, axis=0), S)
        shared = np.tile(race(np.ones((C + 1, C), dtype=bool), S), (K, 1))
        row = np.repeat(np.arange(n_rows), S)
        key = np.concatenate([row * C + topical.ravel(), row * C + shared.ravel()])
        weight = np.concatenate([np.tile((1 - spec.shared_weight) * rank_weight, n_rows),
                                 np.tile(spec.shared_weight * rank_weight, n_rows)])
        self._key, where = np.unique(key, return_inverse=True)  # a token in both supports gets both weights
        self.row, self.next = self._key // C, self._key % C
        self.prob = np.bincount(where, weights=weight)
        # Inverse-CDF sampling for all rows at once: row r's cumulative probabilities shifted into (r, r + 1].
        row_total = np.bincount(self.row, self.prob)
        self._search = self.row + np.cumsum(self.prob) - (np.cumsum(row_total) - row_total)[self.row]
        self._search[np.r_[np.flatnonzero(np.diff(self.row)), len(self.row) - 1]] = np.arange(n_rows) + 1.0

    def entropy_rate(self) -> float:
        """Exact nats/token: E[entropy of a document] / E[tokens of a document] (documents are i.i.d.).

        Per topic k, with P_k the transition matrix over states (start + content) and
        g(s) = H_b(q) + (1 - q) H(P_k[s]) the entropy of the token emitted from state s, the expected
        document entropy is e_start (I - (1 - q) P_k)^-1 g; add the topic token's H(prior) and divide
        by the mean length 1 + 1/q (topic token + content tokens + EOS).
        """
        C, K, q = self.spec.content_tokens, self.spec.topics, self.spec.stop_prob
        row_entropy = np.bincount(self.row, -self.prob * np.log(self.prob), minlength=K * (C + 1)).reshape(K, C + 1)
        step = -q * math.log(q) - (1 - q) * math.log1p(-q) + (1 - q) * row_entropy
        per_topic = np.empty(K)
        for k in range(K):
            mine = slice(*np.searchsorted(self.row, [k * (C + 1), (k + 1) * (C + 1)]))
            P = np.zeros((C + 1, C + 1))
            P[self.row[mine] - k * (C + 1), self.next[mine]] = self.prob[mine]
            visits = np.linalg.solve((np.eye(C + 1) - (1 - q) * P).T, np.eye(C + 1)[C])
            per_topic[k] = visits @ step[k]
        document = -self.prior @ np.log(self.prior) + self.prior @ per_topic
        return float(document / (1 + 1 / q))

    def sample(self, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """A stream of whole documents, cut to n_tokens; all documents advance together, one step per loop."""
        C, q = self.spec.content_tokens, self.spec.stop_prob
        lengths = rng.geometric(q, size=int(n_tokens * q) + 16) - 1  # content tokens per document
        while lengths.sum() + 2 * len(lengths) < n_tokens:
            lengths = np.append(lengths, rng.geometric(q, size=len(lengths)) - 1)
        ends = np.cumsum(lengths + 2)
        keep = np.searchsorted(ends, n_tokens) + 1  # documents up to the one that reaches n_tokens
        lengths, starts = lengths[:keep], ends[:keep] - lengths[:keep] - 2
        topics = rng.choice(self.spec.topics, size=keep, p=self.prior)
        stream = np.empty(ends[keep - 1], dtype=np.int32)
        stream[starts] = self.topic0 + topics
        stream[starts + lengths + 1] = self.eos_id

        order = np.argsort(-lengths, kind="stable")  # longest first: the still-running documents are a prefix
        negative_lengths, starts, rows = -lengths[order], starts[order], topics[order] * (C + 1) + C
        for t in range(-int(negative_lengths[0])):
            running = np.searchsorted(negative_lengths, -t)  # documents with more than t content tokens
            pick = np.searchsorted(self._search, rows[:running] + rng.random(running), side="right")
            token = self.next[pick]
            stream[starts[:running] + 1 + t] = token
            rows[:running] += token - rows[:running] % (C + 1)  # same topic, new state
        return stream[:n_tokens]

    def choice_tasks(self, n: int, rng: np.random.Generator) -> list[dict]:
        """Multiple choice for `isoflop score`: context = a document's topic and first 3 tokens; choices =
        its next 3 tokens, or 3 random content tokens. A model that learnt the topic's chain tells them apart."""
        stream = self.sample(max(50_000, 200 * n), rng)
        documents = [d for d in np.split(stream, np.flatnonzero(stream == self.eos_id) + 1) if len(d) >= 8][:n]
        tasks = []
        for doc in documents:
            choices = [doc[4:7]] + [rng.integers(0, self.spec.content_tokens, 3) for _ in range(3)]
            order = rng.permutation(4)
            tasks.append({"context": " ".join(map(str, doc[:4])),
                          "choices": [" ".join(map(str, choices[i])) for i in order],
                          "answer": int(np.flatnonzero(order == 0)[0])})
        return tasks

    def token_nll(self, stream: np.ndarray) -> np.ndarray:
        """-log p(token | all previous tokens) under the true model; the stream must start a document."""
        C, q = self.spec.content_tokens, self.spec.stop_prob
        stream = np.asarray(stream, dtype=np.int64)
        is_topic = (stream >= self.topic0) & (stream < self.eos_id)
        if not is_topic[0]:
            raise ValueError("token_nll: the stream must start with a topic token")
        topic = (stream[is_topic] - self.topic0)[np.cumsum(is_topic) - 1]
        nll = np.where(is_topic, -np.log(self.prior[topic]), -math.log(q))
        content = stream < C
        previous = np.r_[0, stream[:-1]][content]
        state = np.where(previous < C, previous, C)
        key = (topic[content] * (C + 1) + state) * C + stream[content]
        at = np.minimum(np.searchsorted(self._key, key), len(self._key) - 1)
        found = self._key[at] == key
        nll[content] = -np.log(np.where(found, (1 - q) * self.prob[at], 0.0))
        return nll


def _zipf(n: int, exponent: float) -> np.ndarray:
    weight = np.arange(1, n + 1, dtype=float) ** -exponent
    return weight / weight.sum()


def synthetic(out: str | Path, *, tokens: int = 2_000_000, seed: int = 0, val_tokens: int | None = None,
              overwrite: bool = False) -> DatasetInfo:
    """Write the synthetic corpus: `tokens` train tokens and `val_tokens` (default max(1%, 65536)) val
    tokens, independent samples of the same language. Same (tokens, seed, val_tokens): same fingerprint."""
    val_tokens = max(tokens // 100, 1 << 16) if val_tokens is None else val_tokens
    if tokens < 1 or val_tokens < 1 or seed < 0:
        raise DataError(f"synthetic: tokens, val_tokens must be positive and seed non-negative, "
                        f"got tokens={tokens} val_tokens={val_tokens} seed={seed}")
    language = SyntheticLanguage()
    out = Path(out)
    with _staged(out, overwrite) as folder:
        for split, n, stream in (("train", tokens, 0), ("val", val_tokens, 1)):
            sample = language.sample(n, np.random.default_rng([seed, stream]))
            sample.astype(_dtype(language.vocab_size)).tofile(folder / f"{split}.bin")
        with open(folder / "tasks.jsonl", "w") as f:  # a held-out task for `isoflop score`
            f.writelines(json.dumps(task) + "\n" for task in language.choice_tasks(200, np.random.default_rng([seed, 2])))
        _write_dataset(folder, "synthetic", language.vocab_size, language.eos_id, {"train": tokens, "val": val_tokens},
                       {"entropy_rate_nats": language.entropy_rate(), "seed": seed,
                        "synthetic": asdict(language.spec)})
    return load_dataset(out).info
