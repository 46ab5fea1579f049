import json
import os
import random
from pathlib import Path

import pytest

# Reference data ships beside the repository in CI; a user's clone may not have it.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (it ships with CI, not with a clone)")
    return REFERENCE


def write_word_jsonl(path: Path, documents: int) -> Path:
    """A small user corpus for `isoflop data prepare`: jsonl documents of 20-80 words from a 10-word vocabulary."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "scaling", "laws", "masked", "diffusion", "tokens", "compute"]
    with open(path, "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n")
    return path


os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread than on two that contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(capsys, *args) -> tuple[int, str, str]:
    """`isoflop ARGS` in this process: (exit code, stdout, stderr)."""
    from pipeline.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A briefly trained MDM and ARM (tests/helpers.py: TINY_RECIPE, TINY_SHAPE), shared by the modules that score,
    sample and evaluate them: {family: run folder}."""
    import torch
    from helpers import train_tiny_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_models(tmp_path_factory.mktemp("trained"))
    finally:
        torch.set_num_threads(threads)
