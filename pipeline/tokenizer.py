"""Text <-> token ids for a prepared data folder, for prompts, tasks and printing samples.

A folder's tokenizer is UTF-8 bytes ("byte"), its own `tokenizer.json` (BPE trained or copied by
`isoflop data prepare`), or, for the synthetic corpus, which has no text, space-separated integer ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data import EOS, DataError, load_dataset


@dataclass(frozen=True)
class Tokenizer:
    kind: str              # "byte", "hf" or "ids"
    vocab_size: int
    eos_id: int
    hf: object | None = None  # tokenizers.Tokenizer when kind == "hf"

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode())
        if self.kind == "hf":
            return self.hf.encode(text, add_special_tokens=False).ids
        return self._parse_ids(text)

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


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a data folder made by `isoflop data`."""
    info = load_dataset(data_dir).info
    saved = Path(data_dir) / "tokenizer.json"
    if saved.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        return Tokenizer("hf", info.vocab_size, info.eos_id, HFTokenizer.from_file(str(saved)))
    if info.tokenizer in ("byte", "synthetic"):
        return Tokenizer("byte" if info.tokenizer == "byte" else "ids", info.vocab_size, info.eos_id)
    raise DataError(f"data: {data_dir}: tokenizer {info.tokenizer!r} but no tokenizer.json in the folder")
