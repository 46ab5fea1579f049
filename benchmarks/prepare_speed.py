"""Speed and memory of `isoflop data prepare` on a generated jsonl corpus (default 200 MB), against the
tokenizer's own batch encoder on the same text in the same invocation.

Reports tokens/s per core of the prepare (all of it: counting pass, reading, parsing, encoding in worker
processes, writing shards, fingerprint) and of `encode_batch` alone, timing only its calls: on all cores
(the Hugging Face tokenizer's own threads) over the same corpus, and on one thread (a fresh process) over
its first --one-core-mb MB; their ratios, the same per CPU-second (robust to other jobs sharing the
cores), and the peak RSS of the prepare's whole process tree (itself and its workers, sampled every
20 ms). Targets: ratio >= 0.8, peak RSS < 2 GB. The corpus and a BPE of --vocab ids trained on its first
10 MB are cached in --workdir, so the prepare is timed with a fixed tokenizer.json.

Usage: python benchmarks/prepare_speed.py [--size-mb 200] [--files 8] [--vocab 4096] [--jobs N] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from pipeline.data.corpus import documents  # noqa: E402
from pipeline.data.prepare import available_cores, prepare  # noqa: E402

TARGET_RATIO, TARGET_RSS_GB = 0.8, 2.0


def make_corpus(folder: Path, size_mb: int, files: int, seed: int = 0) -> list[Path]:
    """`files` jsonl files of about size_mb MB in all: documents of 30-600 Zipf-distributed pseudo-words."""
    paths = [folder / f"part{i:02d}.jsonl" for i in range(files)]
    done = folder / "complete"
    if done.is_file() and done.read_text() == f"{size_mb} {files} {seed}":
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(1, 11))) for _ in range(30_000)])
    weights = 1 / np.arange(1, len(words) + 1) ** 1.1
    weights /= weights.sum()
    per_file, doc_id = size_mb * 1_000_000 // files, 0
    for path in paths:
        with open(path, "w") as f:
            written = 0
            while written < per_file:
                picked = words[rng.choice(len(words), size=20_000, p=weights)]
                for n in rng.integers(30, 600, size=100):
                    chunk, picked = picked[:n], picked[n:]
                    if not len(chunk):
                        break
                    line = json.dumps({"id": doc_id, "text": " ".join(chunk) + "."}) + "\n"
                    written += f.write(line)
                    doc_id += 1
    done.write_text(f"{size_mb} {files} {seed}")
    return paths


def trained_tokenizer(folder: Path, corpus: list[Path], vocab: int) -> Path:
    path = folder / f"bpe{vocab}.json"  # next to the corpus it was trained on
    if not path.is_file():
        from pipeline.data.tokenizer import Tokenizer

        budget = [10_000_000]

        def sample():  # the first 10 MB of text
            for doc in documents(corpus):
                budget[0] -= len(doc)
                if budget[0] < 0:
                    return
                yield doc

        Tokenizer.from_spec(f"bpe:{vocab}", sample()).hf.save(str(path))
    return path


class PeakRSS:
    """The largest sum of RSS over this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.02):
        self.peak, self.cpu, self._interval, self._stop = 0, 0.0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass  # a worker that just exited
            self.peak = max(self.peak, total)
            self.cpu = time.thread_time()  # this thread's own CPU time, not the prepare's
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished, waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def baseline(tokenizer: Path, corpus: list[Path], max_chars: float = float("inf"),
             batch: int = 1024) -> tuple[int, float, float]:
    """Tokens, wall seconds and CPU seconds of `encode_batch` alone over the corpus's documents (the first
    `max_chars` characters of them), in batches of `batch` documents."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tokenizer))
    tokens, wall, cpu, chars = 0, 0.0, 0.0, 0
    docs = documents(corpus)
    while chars < max_chars and (texts := [doc for _, doc in zip(range(batch), docs)]):
        chars += sum(map(len, texts))
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        encoded = hf.encode_batch(texts, add_special_tokens=False)
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
        tokens += sum(len(e) for e in encoded)
    return tokens, wall, cpu


def baseline_one_core(tokenizer: Path, corpus: list[Path], max_chars: float) -> tuple[int, float, float]:
    """`baseline` in a fresh process whose tokenizer runs one thread: the batch encoder's speed per core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before the tokenizer is first used in this process
    return baseline(tokenizer, corpus, max_chars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--jobs", type=int, default=None, help="prepare's workers (default: one per core)")
    parser.add_argument("--one-core-mb", type=int, default=40, help="text for the one-thread encode_batch baseline")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/isoflop-prepare-speed"))
    args = parser.parse_args()
    cores = available_cores()
    jobs = args.jobs or cores

    start = time.perf_counter()
    corpus = make_corpus(args.workdir / f"corpus-{args.size_mb}mb", args.size_mb, args.files)
    size = sum(p.stat().st_size for p in corpus)
    tokenizer = trained_tokenizer(corpus[0].parent, corpus, args.vocab)
    print(f"corpus: {len(corpus)} files, {size / 1e6:.0f} MB; tokenizer {tokenizer.name} "
          f"({time.perf_counter() - start:.0f} s to generate or load)", flush=True)

    out = args.workdir / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    with PeakRSS() as rss:
        info = prepare([str(p) for p in corpus], out, tokenizer=str(tokenizer), jobs=jobs,
                       progress=lambda line: print("  " + line, flush=True))
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0 - rss.cpu
    tokens = info.tokens["train"] + info.tokens["val"]
    documents_written = sum(json.loads((out / "meta.json").read_text())["documents"].values())
    base_tokens, base_wall, base_cpu = baseline(tokenizer, corpus)
    if base_tokens != tokens - documents_written:  # prepare adds one EOS per document
        raise SystemExit(f"token counts differ: prepare {tokens - documents_written}, encode_batch {base_tokens}")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as one:
        one_tokens, one_wall, one_cpu = one.submit(baseline_one_core, tokenizer, corpus, args.one_core_mb * 1e6).result()

    per_core, base_per_core = tokens / wall / cores, base_tokens / base_wall / cores
    per_cpu, base_per_cpu = tokens / cpu, base_tokens / base_cpu
    print(f"\nprepare     : {tokens:,} tokens in {wall:.1f} s wall, {cpu:.1f} CPU-s on {cores} cores ({jobs} workers): "
          f"{per_core:,.0f} tokens/s per core, {per_cpu:,.0f} tokens per CPU-s")
    print(f"encode_batch: {base_tokens:,} tokens in {base_wall:.1f} s wall, {base_cpu:.1f} CPU-s: "
          f"{base_per_core:,.0f} tokens/s per core, {base_per_cpu:,.0f} tokens per CPU-s")
    print(f"encode_batch, one thread, first {args.one_core_mb} MB: {one_tokens:,} tokens in {one_wall:.1f} s wall, "
          f"{one_cpu:.1f} CPU-s: {one_tokens / one_wall:,.0f} tokens/s, {one_tokens / one_cpu:,.0f} tokens per CPU-s")
    print(f"ratio to encode_batch on all cores: per core {per_core / base_per_core:.2f}, per CPU-second "
          f"{per_cpu / base_per_cpu:.2f}; to encode_batch on one thread: per core {per_core * one_wall / one_tokens:.2f}, "
          f"per CPU-second {per_cpu * one_cpu / one_tokens:.2f} (target >= {TARGET_RATIO})")
    print(f"peak RSS of the process tree {rss.peak / 2**30:.2f} GB "
          f"(target < {TARGET_RSS_GB}); shards: {len(list(out.glob('*.bin')))}")


if __name__ == "__main__":
    main()
