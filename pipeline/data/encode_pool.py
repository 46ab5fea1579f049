"""Tokenize batches of documents over all cores, results in input order, with bounded memory.

The reading process hands each worker a batch of documents with the mask of those that go to the
validation split, and gets back two arrays: the batch's train and val token ids, each document followed
by EOS. At most two batches per worker are in flight, so memory does not grow with the corpus. Workers
are spawned (not forked: the tokenizer's own thread pool may already be running) and each encodes on
one thread, the processes being the parallelism. This module imports nothing of the project but the
tokenizer, so a worker starts in a fraction of a second.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pipeline.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Encoded:
    train: np.ndarray  # ids of the batch's train documents, each followed by EOS, in the dataset's dtype
    val: np.ndarray
    val_bytes: int     # UTF-8 bytes of the batch's val documents (for bits per byte)


def encode(codec: Tokenizer, docs: list[str], is_val: np.ndarray, dtype: np.dtype) -> Encoded:
    """One batch, as the single-process writer wrote it: every document in order, then EOS, to its split."""
    eos = np.array([codec.eos_id], dtype=dtype)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for ids, val in zip(codec.encode_batch(docs), is_val.tolist()):
        parts[val] += [ids.astype(dtype), eos]
    val_bytes = sum(len(doc.encode()) for doc, val in zip(docs, is_val.tolist()) if val)
    train, val = (np.concatenate(parts[v]) if parts[v] else np.empty(0, dtype) for v in (False, True))
    return Encoded(train, val, val_bytes)


def encode_all(codec: Tokenizer, batches: Iterable[tuple[list[str], np.ndarray]], dtype: np.dtype,
               jobs: int) -> Iterator[Encoded]:
    """`encode` over (documents, is_val) batches, in order; in this process if jobs == 1, else in `jobs` workers."""
    if jobs == 1:
        yield from (encode(codec, docs, is_val, dtype) for docs, is_val in batches)
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(codec,))
    try:
        pending: collections.deque = collections.deque()
        for docs, is_val in batches:
            pending.append(pool.submit(_encode_in_worker, docs, is_val, dtype))
            if len(pending) >= 2 * jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


_codec: Tokenizer | None = None


def _start_worker(codec: Tokenizer) -> None:
    global _codec
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _codec = codec


def _encode_in_worker(docs: list[str], is_val: np.ndarray, dtype: np.dtype) -> Encoded:
    return encode(_codec, docs, is_val, dtype)
