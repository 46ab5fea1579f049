import os
from pathlib import Path

import pytest

# Reference data ships beside the repository in CI; a user's clone may not have it.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (it ships with CI, not with a clone)")
    return REFERENCE


os.environ.setdefault("DS_ACCELERATOR", "cpu")
