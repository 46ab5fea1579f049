"""The on-disk token dataset: its format, reading batches from it, and the helpers that write one.

A dataset is a folder holding each split's token stream (raw uint16 or uint32 token ids, documents
packed and each followed by EOS), `meta.json`, and `tokenizer.json` when a Hugging Face tokenizer
made it. A split's stream is one file, `train.bin` / `val.bin` (format 1: the synthetic corpus, and
folders prepared before sharding), or the concatenation of the shard files meta.json lists in order
(format 2: `train-00000.bin`, ..., at most SHARD_TOKENS tokens each, so files stay a manageable size
however large the corpus). Both read as one stream, and the fingerprint hashes that stream, so a
corpus has the same fingerprint and the same batches in either layout. Folders are built under a hidden sibling name and renamed into place when complete, so a
folder with a `meta.json` is always a finished one. Two writers make them: pipeline.data.prepare (real
text) and pipeline.data.synthetic (the synthetic corpus, see docs/synthetic_corpus.md).

Batches are pure functions of (seed, step, rank, world_size, batch_size, seq_len): the train split is
cut into non-overlapping blocks of seq_len + 1 tokens, visited in a seeded permutation per epoch, and
global batch `step` takes the next batch_size * world_size blocks of that single stream, rank r taking
the r-th slice. So 2 ranks of batch b read exactly what 1 rank of batch 2b reads, and a resumed run
reads exactly the batches it would have read. A run on a unique-data subset (`unique_tokens`) draws from the
split's first unique_tokens // (seq_len + 1) blocks alone, the same prefix on every rank and every rerun.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import DataError

if TYPE_CHECKING:
    import torch

META = "meta.json"
FORMAT = 1           # one file per split
SHARDED_FORMAT = 2   # shard files per split, listed in meta.json
SHARD_TOKENS = 1 << 29
SPLITS = ("train", "val")


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

    def train_blocks(self, seq_len: int) -> int:
        """Training blocks of seq_len + 1 tokens: how many sequences one epoch holds."""
        return self.tokens["train"] // (seq_len + 1)


# --------------------------------------------------------------------------------------------- reading

class TokenDataset:
    """A prepared folder opened as memmaps; every read is a pure function of its arguments."""

    def __init__(self, info: DatasetInfo, dtype: np.dtype, shards: dict[str, list[tuple[str, int]]]):
        self.info = info
        self._split = {s: _Stream([info.path / name for name, _ in shards[s]], dtype) for s in SPLITS}

    def num_train_blocks(self, seq_len: int) -> int:
        return self.info.train_blocks(seq_len)

    def train_batch(self, *, step: int, rank: int, world_size: int, batch_size: int, seq_len: int,
                    seed: int, unique_tokens: int | None = None) -> torch.LongTensor:
        """Rank `rank`'s [batch_size, seq_len + 1] share of global batch `step`, drawn from the whole split or
        from the prefix of its blocks that holds `unique_tokens`."""
        if not (0 <= rank < world_size and batch_size > 0 and seq_len > 0 and step >= 0 and seed >= 0):
            raise DataError(f"train_batch: bad arguments step={step} rank={rank} world_size={world_size} "
                            f"batch_size={batch_size} seq_len={seq_len} seed={seed}")
        n_blocks = self._drawn_blocks(seq_len, unique_tokens)
        first = (step * world_size + rank) * batch_size  # position in the endless stream of blocks
        epoch, offset = np.divmod(np.arange(first, first + batch_size), n_blocks)
        blocks = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            blocks[here] = _epoch_order(seed, int(e), n_blocks)[offset[here]]
        return self._blocks("train", blocks, seq_len)

    def _drawn_blocks(self, seq_len: int, unique_tokens: int | None) -> int:
        """How many blocks, from the first, batches are drawn from."""
        n_blocks = self.num_train_blocks(seq_len)
        if n_blocks < 1:
            raise DataError(f"data: {self.info.path} has no training block of seq_len+1={seq_len + 1} tokens")
        if unique_tokens is None:
            return n_blocks
        subset = unique_tokens // (seq_len + 1)
        if not 1 <= subset <= n_blocks:
            raise DataError(f"unique_tokens: {unique_tokens:,} tokens make {subset:,} blocks of seq_len+1="
                            f"{seq_len + 1}; the training split of {self.info.path} holds {n_blocks:,} "
                            f"({self.info.tokens['train']:,} tokens)")
        return subset

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
        index = blocks[:, None] * width + np.arange(width)
        import torch  # here, not at the top: `isoflop data prepare` never loads torch (200 MB less per process)

        return torch.from_numpy(self._split[split].take(index).astype(np.int64))

    def read_split(self, split: str) -> np.ndarray:
        """A whole split's token stream in memory, for inspection (training reads blocks)."""
        return self._split[split].whole()


class _Stream:
    """A split's shard files as one array of token ids, memory-mapped."""

    def __init__(self, files: list[Path], dtype: np.dtype):
        self._parts = [np.memmap(f, dtype=dtype, mode="r") for f in files]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def whole(self) -> np.ndarray:
        return np.concatenate([np.asarray(part) for part in self._parts])

    def take(self, index: np.ndarray) -> np.ndarray:
        if len(self._parts) == 1:
            return np.asarray(self._parts[0][index])  # memmap fancy indexing reads only these pages
        shard = np.searchsorted(self._starts, index, side="right") - 1
        out = np.empty(index.shape, dtype=self._parts[0].dtype)
        for k in np.unique(shard):
            here = shard == k
            out[here] = self._parts[k][index[here] - self._starts[k]]
        return out


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

    layout = field("format", int)
    if layout not in (FORMAT, SHARDED_FORMAT):
        raise DataError(f"data: {meta_file}: format {layout} is not {FORMAT} or {SHARDED_FORMAT}; prepare it again")
    dtype = field("dtype", str)
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"data: {meta_file}: dtype must be uint16 or uint32, got {dtype!r}")
    vocab_size, eos_id, tokens = field("vocab_size", int), field("eos_id", int), field("tokens", dict)
    if not 0 <= eos_id < vocab_size <= np.iinfo(dtype).max + 1:
        raise DataError(f"data: {meta_file}: eos_id={eos_id} / vocab_size={vocab_size} do not fit {dtype}")
    shards = {}
    for split in SPLITS:
        n = tokens.get(split)
        if not isinstance(n, int) or n < 1:
            raise DataError(f"data: {meta_file}: tokens.{split} must be a positive integer, got {n!r}")
        shards[split] = [(f"{split}.bin", n)] if layout == FORMAT else _listed_shards(meta, meta_file, split, n)
        for name, count in shards[split]:
            shard = path / name
            size = shard.stat().st_size if shard.is_file() else None
            if size != count * np.dtype(dtype).itemsize:
                raise DataError(f"data: {shard}: expected {count} {dtype} tokens, found "
                                f"{'no file' if size is None else f'{size} bytes'} (corrupt or incomplete)")
    optional = {name: meta.get(name) for name in ("entropy_rate_nats", "bytes_per_token")}
    for name, value in optional.items():
        if value is not None and not isinstance(value, (int, float)):
            raise DataError(f"data: {meta_file}: field {name!r} must be a number or null, got {value!r}")
    info = DatasetInfo(path=path, vocab_size=vocab_size, eos_id=eos_id, tokenizer=field("tokenizer", str),
                       fingerprint=field("fingerprint", str), tokens={s: tokens[s] for s in SPLITS}, **optional)
    return TokenDataset(info, np.dtype(dtype), shards)


def _listed_shards(meta: dict, meta_file: Path, split: str, n: int) -> list[tuple[str, int]]:
    """A sharded folder's (file name, tokens) list for one split, checked against the split's total."""
    listed = meta.get("shards", {}).get(split) if isinstance(meta.get("shards"), dict) else None
    try:
        shards = [(entry["file"], entry["tokens"]) for entry in listed]
    except (TypeError, KeyError):
        shards = []
    if not shards or any(not isinstance(name, str) or Path(name).name != name or not isinstance(count, int)
                         or count < 1 for name, count in shards) or sum(c for _, c in shards) != n:
        raise DataError(f"data: {meta_file}: shards.{split} must list files in this folder whose tokens add "
                        f"up to tokens.{split}={n}, got {listed!r:.200}")
    return shards


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a data folder made by `isoflop data`."""
    info = load_dataset(data_dir).info
    saved = Path(data_dir) / "tokenizer.json"
    if saved.is_file():
        return Tokenizer.from_file(saved, vocab_size=info.vocab_size, eos_id=info.eos_id, name=info.tokenizer)
    if info.tokenizer in ("byte", "synthetic"):
        return Tokenizer("byte" if info.tokenizer == "byte" else "ids", info.vocab_size, info.eos_id,
                         name=info.tokenizer)
    raise DataError(f"data: {data_dir}: tokenizer {info.tokenizer!r} but no tokenizer.json in the folder")


# --------------------------------------------------------------------------------------------- writing
# Shared by both writers (pipeline.data.prepare, pipeline.data.synthetic): the fingerprint must be computed one
# way only, since it is part of every finished run's identity.

@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden sibling folder to build in; rename it to `out` only if the block finishes."""
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        check_target(out, overwrite)
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


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an empty folder or, with overwrite, a finished dataset."""
    if not out.exists():
        return
    is_dataset = (out / META).is_file()
    if not out.is_dir() or (not is_dataset and any(out.iterdir())):
        raise DataError(f"data: {out} exists and is not a dataset folder; refusing to write there")
    if is_dataset and not overwrite:
        raise DataError(f"data: {out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")


def write_dataset(folder: Path, tokenizer: str, vocab_size: int, eos_id: int, tokens: dict[str, int],
                  extra: dict, shards: dict[str, list[tuple[str, int]]] | None = None) -> None:
    """Fingerprint the token files already in `folder` and write meta.json (last, so it marks completion).

    Without `shards` each split is `{split}.bin` (format 1); with it, the listed (file, tokens) shards
    in order (format 2). The fingerprint hashes the tokenizer, then the train stream, then the val stream."""
    digest = hashlib.sha256()
    tokenizer_json = folder / "tokenizer.json"
    digest.update(tokenizer_json.read_bytes() if tokenizer_json.exists() else tokenizer.encode())
    files = shards or {split: [(f"{split}.bin", tokens[split])] for split in SPLITS}
    for split in SPLITS:
        for name, _ in files[split]:
            with open(folder / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
    layout = {"format": SHARDED_FORMAT, "shards": {split: [{"file": name, "tokens": n} for name, n in files[split]]
                                                  for split in SPLITS}} if shards else {"format": FORMAT}
    meta = {**layout, "tokenizer": tokenizer, "vocab_size": vocab_size, "eos_id": eos_id,
            "dtype": token_dtype(vocab_size).name, "tokens": tokens, "fingerprint": digest.hexdigest()[:16],
            "entropy_rate_nats": None, "bytes_per_token": None, **extra}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id; load_dataset reads it back from meta.json."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
