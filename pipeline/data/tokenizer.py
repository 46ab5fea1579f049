"""Text <-> token ids: the one tokenizer wrapper, used both to prepare a corpus and to encode prompts.

Three kinds: "byte" (UTF-8 bytes, ids 0..255, EOS 256), "hf" (a Hugging Face tokenizer: a BPE trained
by `isoflop data prepare`, or a tokenizer.json the user gave; the data folder keeps its own copy), and
"ids" for the synthetic corpus, which has no text, so its prompts are space-separated integer ids.
The tokenizer of a finished data folder is opened by `pipeline.data.dataset.load_tokenizer`.

This module imports nothing of the project but pipeline.errors, so the data modules can build on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.errors import DataError

EOS = "<|endoftext|>"  # the end-of-document token's text; its id is recorded per dataset as eos_id
BYTE_VOCAB = 257       # "byte" tokenizer: ids 0..255 are UTF-8 bytes, 256 is EOS
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>")  # what an existing tokenizer may call its EOS


@dataclass(frozen=True)
class Tokenizer:
    kind: str                 # "byte", "hf" or "ids"
    vocab_size: int
    eos_id: int
    hf: object | None = None  # tokenizers.Tokenizer when kind == "hf"
    name: str = ""            # what meta.json records as "tokenizer": "byte", "bpe:VOCAB", a path, "synthetic"

    # ------------------------------------------------------------------------------------ making one

    @classmethod
    def from_spec(cls, spec: str, documents: Iterable[str]) -> Tokenizer:
        """The tokenizer `--tokenizer SPEC` names: "byte", "bpe:VOCAB" (trained on `documents`, which
        nothing else reads) or an existing tokenizer.json (given an EOS if it has none)."""
        if spec == "byte":
            return cls("byte", BYTE_VOCAB, BYTE_VOCAB - 1, name="byte")
        if spec.startswith("bpe:"):
            hf = _train_bpe(spec, documents)
        elif spec.endswith(".json"):
            hf = _load_with_eos(spec)
        else:
            raise _bad_spec(spec)
        eos_id = next(hf.token_to_id(name) for name in EOS_NAMES if hf.token_to_id(name) is not None)
        return cls("hf", hf.get_vocab_size(), eos_id, hf, name=spec)

    @staticmethod
    def check_spec(spec: str) -> None:
        """Fail on a spec `from_spec` cannot make, without training or reading documents."""
        if spec.startswith("bpe:"):
            _bpe_vocab(spec)
        elif spec.endswith(".json"):
            _load_with_eos(spec)
        elif spec != "byte":
            raise _bad_spec(spec)

    @classmethod
    def from_file(cls, path: str | Path, *, vocab_size: int, eos_id: int, name: str) -> Tokenizer:
        """A tokenizer.json saved by `save`; vocab_size and eos_id come from the folder's meta.json."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls("hf", vocab_size, eos_id, HFTokenizer.from_file(str(path)), name=name)

    def as_hf(self):
        """This tokenizer as a `tokenizers.Tokenizer` with the same ids, text in and text out, for tools that take
        that form: a copy of a Hugging Face one; bytes as a byte-level BPE without merges; the synthetic corpus's
        ids as words named by their decimal number, EOS included (so a prompt is still ids separated by spaces)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        if self.kind == "hf":
            return HFTokenizer.from_str(self.hf.to_str())
        if self.kind == "byte":
            vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
            hf = HFTokenizer(models.BPE({**vocab, EOS: self.eos_id}, []))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            hf.add_special_tokens([EOS])  # kept whole, as the BPE tokenizers keep theirs
            return hf
        hf = HFTokenizer(models.WordLevel({str(i): i for i in range(self.vocab_size)}, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no [UNK] in the vocabulary: other words are an error
        return hf

    def save(self, folder: str | Path) -> None:
        """Write `folder`/tokenizer.json for an "hf" tokenizer (bytes and ids need no file)."""
        if self.hf is not None:
            self.hf.save(str(Path(folder) / "tokenizer.json"))

    # ------------------------------------------------------------------------------------ using one

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode())
        if self.kind == "hf":
            return self.hf.encode(text, add_special_tokens=False).ids
        return self._parse_ids(text)

    def encode_batch(self, docs: list[str]) -> list[np.ndarray]:
        """Each document's ids, without EOS; the Hugging Face path encodes the batch in parallel."""
        if self.kind == "byte":
            return [np.frombuffer(doc.encode(), dtype=np.uint8) for doc in docs]
        if self.kind == "hf":
            return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(docs, add_special_tokens=False)]
        return [np.asarray(self._parse_ids(doc), dtype=np.int64) for doc in docs]

    def encode_prompt(self, text: str) -> list[int]:
        """EOS, then the text: training data puts EOS before every document, so this marks a document start."""
        return [self.eos_id, *self.encode(text)]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "byte":
            pieces, run = [], bytearray()
            for i in ids:
                if i == self.eos_id:
                    pieces += [run.decode(errors="replace"), EOS]
                    run = bytearray()
                else:
                    run.append(i)
            return "".join(pieces + [run.decode(errors="replace")])
        if self.kind == "hf":
            return self.hf.decode(ids, skip_special_tokens=False)
        return " ".join(map(str, ids))

    def _parse_ids(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not word.isdigit() or int(word) >= self.vocab_size:
                raise DataError(f"prompt: this corpus has no text; give token ids 0..{self.vocab_size - 1} "
                                f"separated by spaces (got {word!r})")
            ids.append(int(word))
        return ids


def _byte_symbols() -> list[str]:
    """The character byte-level tokenizers write for each byte 0..255 (GPT-2's table): the printable Latin-1
    bytes stand for themselves, the other 68 take the characters from 256 on, in byte order."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 256 + 256 - len(printable)))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def _train_bpe(spec: str, documents: Iterable[str]):
    """A byte-level BPE of VOCAB ids (EOS included), so every string encodes without an unknown token."""
    vocab = _bpe_vocab(spec)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def _bad_spec(spec: str) -> DataError:
    return DataError(f"tokenizer: must be 'byte', 'bpe:VOCAB' or an existing tokenizer.json, got {spec!r}")


def _bpe_vocab(spec: str) -> int:
    vocab = spec[4:]
    if not vocab.isdigit() or int(vocab) <= BYTE_VOCAB:
        raise DataError(f"tokenizer: {spec!r}: VOCAB must be an integer above {BYTE_VOCAB} "
                        "(256 byte symbols + EOS)")
    return int(vocab)


def _load_with_eos(spec: str):
    """A user's tokenizer.json; one without any known EOS gets ours (the saved copy records it)."""
    if not Path(spec).is_file():
        raise DataError(f"tokenizer: {spec}: no such file")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(spec)
    except Exception as err:  # tokenizers raises its own exception types
        raise DataError(f"tokenizer: {spec}: not a tokenizer.json ({err})") from None
    if not any(hf.token_to_id(name) is not None for name in EOS_NAMES):
        hf.add_special_tokens([EOS])
    return hf
