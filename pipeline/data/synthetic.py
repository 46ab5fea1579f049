"""The synthetic corpus: a topic-mixture Markov language with an exact entropy rate, and its writer.

A scaling-law fit's irreducible loss E can be checked against the truth on this corpus, which no
natural-text corpus allows; docs/synthetic_corpus.md describes the language, its parameters and how
the entropy rate is computed.

The output (token files, tasks.jsonl, fingerprint) is a pure function of (tokens, seed, val_tokens).
Fingerprints are part of finished runs' identity: a change here that alters the bytes orphans them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.data.dataset import DatasetInfo, load_dataset, staged, token_dtype, write_dataset
from pipeline.errors import DataError


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
              overwrite: bool = False, spec: SyntheticSpec = SyntheticSpec()) -> DatasetInfo:
    """Write the synthetic corpus: `tokens` train tokens and `val_tokens` (default max(1%, 65536)) val
    tokens, independent samples of the language `spec`. Same (tokens, seed, val_tokens, spec): same
    fingerprint."""
    val_tokens = max(tokens // 100, 1 << 16) if val_tokens is None else val_tokens
    if tokens < 1 or val_tokens < 1 or seed < 0:
        raise DataError(f"synthetic: tokens, val_tokens must be positive and seed non-negative, "
                        f"got tokens={tokens} val_tokens={val_tokens} seed={seed}")
    language = SyntheticLanguage(spec)
    out = Path(out)
    with staged(out, overwrite) as folder:
        for split, n, stream in (("train", tokens, 0), ("val", val_tokens, 1)):
            sample = language.sample(n, np.random.default_rng([seed, stream]))
            sample.astype(token_dtype(language.vocab_size)).tofile(folder / f"{split}.bin")
        with open(folder / "tasks.jsonl", "w") as f:  # a held-out task for `isoflop score`
            f.writelines(json.dumps(task) + "\n" for task in language.choice_tasks(200, np.random.default_rng([seed, 2])))
        write_dataset(folder, "synthetic", language.vocab_size, language.eos_id, {"train": tokens, "val": val_tokens},
                       {"entropy_rate_nats": language.entropy_rate(), "seed": seed,
                        "synthetic": asdict(language.spec)})
    return load_dataset(out).info
