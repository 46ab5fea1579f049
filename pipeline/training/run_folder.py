"""A finished run's folder: its fp32 weights (`model.safetensors`) and its description (`result.json`).

Training writes the description last and atomically, so its presence means the run is complete; the
sweep logs both files as the run's MLflow logged model, and the description to the run itself. Everything
that asks "is this run finished?" or loads a finished run's model goes through here (`pipeline.use.loading`
adds the other sources: an MLflow run, an exported folder).
DeepSpeed's own resumable checkpoints are another thing: they live in `checkpoints/` beside these
files while the run trains, and go once the weights are written. Folders finished before the weights
moved to safetensors hold `model.pt` instead, and load as before.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.data.dataset import DatasetInfo, load_tokenizer
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import RunFolderError
from pipeline.model.family import FAMILIES, Family
from pipeline.model.shapes import resolve_shape
from pipeline.model.transformer import Transformer
from pipeline.recipe import RunSpec

WEIGHTS, DESCRIPTION = "model.safetensors", "result.json"
LEGACY_WEIGHTS = "model.pt"  # what finished runs held before safetensors: a torch pickle


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of_point(cls, storage: str | Path, run_hash: str) -> RunFolder:
        """A sweep point's folder in the sweep's storage."""
        return cls(Path(storage) / "runs" / run_hash)

    @property
    def checkpoints(self) -> Path:
        """DeepSpeed's resumable checkpoints, there while the run trains."""
        return self.path / "checkpoints"

    @property
    def weights(self) -> Path:
        """The weights file: model.safetensors, or model.pt in a folder finished before safetensors."""
        present = {name for name in (WEIGHTS, LEGACY_WEIGHTS) if (self.path / name).is_file()}
        return self.path / weights_name(present)

    @property
    def files(self) -> list[Path]:
        """(weights, description): what a finished run's MLflow logged model holds."""
        return [self.weights, self.path / DESCRIPTION]

    def is_finished(self, run_hash: str | None = None) -> bool:
        """Whether the folder holds a finished run (the run `run_hash`, when given)."""
        if not (self.path / DESCRIPTION).is_file():
            return False
        return run_hash is None or self.result()["run_hash"] == run_hash

    def write(self, state: dict[str, torch.Tensor], spec: RunSpec, data: DatasetInfo, result) -> None:
        """fp32 weights, loadable without DeepSpeed, then the description (`result`: a TrainResult)."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, self.path / WEIGHTS)
        (self.path / LEGACY_WEIGHTS).unlink(missing_ok=True)  # one weights file: a retrained folder's old one goes
        description = {"spec": spec.identity(), "run_name": spec.run_name, "data": str(data.path),
                       "vocab_size": data.vocab_size, "result": asdict(result)}
        tmp = self.path / f"{DESCRIPTION}.tmp"
        tmp.write_text(json.dumps(description, indent=2))
        os.replace(tmp, self.path / DESCRIPTION)  # last: its presence means the run is complete

    def description(self) -> dict:
        try:
            return json.loads((self.path / DESCRIPTION).read_text())
        except (OSError, ValueError) as err:
            raise RunFolderError(f"checkpoint: {self.path / DESCRIPTION}: unreadable ({type(err).__name__}: {err})") from None

    def result(self) -> dict:
        """The TrainResult fields of a finished run (val_loss, steps, seconds, ...)."""
        return self.description()["result"]

    def load(self, device: str | torch.device = "cpu", source: str | None = None) -> TrainedModel:
        if not self.path.is_dir():
            raise RunFolderError(f"checkpoint: {self.path}: no such folder")
        missing = [f.name for f in self.files if not f.is_file()]
        if missing:
            state = ("an unfinished run: DeepSpeed checkpoints only" if self.checkpoints.is_dir()
                     else "not a finished run's folder")
            raise RunFolderError(f"checkpoint: {self.path} has no {' or '.join(missing)} ({state}; training writes "
                                 "result.json last)")
        description = self.description()
        try:
            spec = description["spec"]
            family = FAMILIES[spec["family"]]
            config = family.model_config(resolve_shape(spec["shape"]), int(description["vocab_size"]),
                                         int(spec["train"]["seq_len"]))
        except (ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"checkpoint: {self.path / DESCRIPTION}: unreadable ({type(err).__name__}: {err})") from None
        model = Transformer(config)
        try:
            model.load_state_dict(read_weights(self.weights))
        except (RuntimeError, OSError, EOFError, SafetensorError) as err:
            raise RunFolderError(f"checkpoint: {self.weights} does not fit {DESCRIPTION}'s model: "
                                 f"{str(err).splitlines()[0]}") from None
        return TrainedModel(model.to(device).eval(), family, Path(description["data"]), description,
                            source or str(self.path))


def weights_name(present: set[str]) -> str:
    """Of the file names a finished run holds, its weights': model.pt only where model.safetensors is absent."""
    return LEGACY_WEIGHTS if LEGACY_WEIGHTS in present and WEIGHTS not in present else WEIGHTS


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a legacy model.pt (unpickled weights-only: tensors, no code)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class TrainedModel:
    model: Transformer     # in eval mode, on the requested device
    family: Family
    data: Path             # the data folder it trained on (its tokenizer)
    description: dict      # result.json: spec, run_name, data, vocab_size, result
    source: str            # the folder or MLflow run it came from, for messages
    own_tokenizer: Tokenizer | None = None  # one that came with the model (an exported folder carries its own)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenizer(self, data_dir: str | Path | None = None) -> Tokenizer:
        """The tokenizer of data_dir, by default the model's own or that of the data folder the run trained on."""
        if data_dir is None and self.own_tokenizer is not None:
            return self.own_tokenizer
        if data_dir is None and not (self.data / "meta.json").is_file():
            raise RunFolderError(f"{self.source} trained on {self.data}, which is not here; pass --data DIR "
                                 "(a data folder with the same tokenizer)")
        return load_tokenizer(data_dir or self.data)
