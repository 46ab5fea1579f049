"""Load a trained model: from a finished run's folder (model.pt + result.json, as `pipeline.train` writes
it) or from the MLflow run a sweep logged those two files to."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import torch

from pipeline.model import ModelConfig, Transformer
from pipeline.objectives import FAMILIES
from pipeline.shapes import resolve_shape
from pipeline.tokenizer import Tokenizer, load_tokenizer

FILES = ("model.pt", "result.json")


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    model: Transformer     # in eval mode, on the requested device
    family: str
    data: Path             # the data folder it trained on (its tokenizer)
    description: dict      # result.json: spec, run_name, data, vocab_size, result
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenizer(self, data_dir: str | Path | None = None) -> Tokenizer:
        """The tokenizer of data_dir, by default of the data folder the run trained on."""
        if data_dir is None and not (self.data / "meta.json").is_file():
            raise CheckpointError(f"{self.source} trained on {self.data}, which is not here; pass --data DIR "
                                  "(a data folder with the same tokenizer)")
        return load_tokenizer(data_dir or self.data)


def model_config(description: dict) -> ModelConfig:
    spec = description["spec"]
    return ModelConfig(resolve_shape(spec["shape"]), int(description["vocab_size"]), int(spec["train"]["seq_len"]),
                       FAMILIES[spec["family"]].causal)


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", source: str | None = None) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint: {folder}: no such folder")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint: {folder} has no {' or '.join(missing)} (not a finished run's folder: "
                              "training writes result.json last)")
    try:
        description = json.loads((folder / "result.json").read_text())
        config = model_config(description)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint: {folder / 'result.json'}: unreadable ({type(err).__name__}: {err})") from None
    model = Transformer(config)
    try:
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint: {folder / 'model.pt'} does not fit result.json's model: "
                              f"{str(err).splitlines()[0]}") from None
    return Checkpoint(model.to(device).eval(), description["spec"]["family"], Path(description["data"]), description,
                      source or str(folder))


def load_run(run_id: str, tracking_uri: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Download a run's model.pt and result.json (logged at the root of its artifacts) and load them."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise CheckpointError(f"--tracking-uri: no MLflow database at {tracking_uri.removeprefix('sqlite:///')}")
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
        present = {f.path for f in client.list_artifacts(run_id)}
    except MlflowException as err:
        raise CheckpointError(f"--run {run_id}: not found in {tracking_uri} ({err.message.splitlines()[0]})") from None
    missing = [name for name in FILES if name not in present]
    if missing:
        raise CheckpointError(f"--run {run_id}: no checkpoint (artifacts lack {', '.join(missing)}; "
                              "the run is unfinished, failed, or not a grid point)")
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # two files: a progress bar each is noise
    with tempfile.TemporaryDirectory(prefix="isoflop-run-") as tmp, patch.dict(os.environ, quiet):
        for name in FILES:
            client.download_artifacts(run_id, name, tmp)
        return load_checkpoint(tmp, device, source=f"run {run_id}")


def load(*, checkpoint: str | None = None, run: str | None = None, tracking_uri: str | None = None,
         device: str | torch.device | None = None) -> Checkpoint:
    """A checkpoint folder or an MLflow run id (tracking URI: the flag, $MLFLOW_TRACKING_URI, ./mlruns.db)."""
    from pipeline.tracking import resolve_uri

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (checkpoint is None) == (run is None):
        raise CheckpointError("give exactly one of --checkpoint DIR or --run RUN_ID")
    if checkpoint is not None:
        return load_checkpoint(checkpoint, device)
    return load_run(run, resolve_uri(tracking_uri, "sqlite:///mlruns.db"), device)
