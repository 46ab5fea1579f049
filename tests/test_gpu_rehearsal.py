"""The GPU machine's one command (benchmarks/gpu_check.sh), rehearsed on this CPU with no package index: the
offline bundle plus the accelerator image's packages must be all the GPU check needs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_from_the_offline_bundle_and_names_a_missing_module(tmp_path):
    cpu_python = Path(sys.base_prefix) / "bin" / "python3"  # the Python the CPU torch wheel is for
    env = {**os.environ, "REHEARSAL_DIR": str(tmp_path), "PY": sys.executable, "CPU_PYTHON": str(cpu_python)}
    proc = subprocess.run(["bash", "benchmarks/gpu_rehearsal.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=840)
    if proc.returncode == 3 and "no Python 3.12 found" in proc.stderr:
        pytest.skip("the rehearsal needs a Python 3.12, the GPU image's, and none is installed here")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "imports and validates: pydantic" in proc.stdout  # the Python 3.12 bundle, in a bare Python 3.12
    manifest = (tmp_path / "bundle-3.12" / "MANIFEST.txt").read_text()
    assert "deepspeed-" in manifest and "-none-any.whl" in manifest and "cp312" in manifest, manifest
    rows = [line.split("|") for line in (tmp_path / "gpu_check.md").read_text().splitlines()[2:]]
    assert sorted(row[2].strip() for row in rows) == ["arm", "mdm"], rows
    assert all(float(row[4].replace(",", "")) > 0 for row in rows), rows  # tokens/s measured, not "failed: ..."

    # the same environment with one wheel gone from the bundle: named before anything is measured
    bundle = tmp_path / "bundle-broken"
    shutil.copytree(tmp_path / f"bundle-{sys.version_info.major}.{sys.version_info.minor}", bundle)
    for wheel in bundle.glob("hjson-*.whl"):
        wheel.unlink()
    broken = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHON": str(tmp_path / "image-env" / "bin" / "python"),
                                 "BUNDLE": str(bundle), "SITE": str(tmp_path / "site-broken"),
                                 "OUT": str(tmp_path / "broken")})
    assert broken.returncode == 2, broken.stderr[-3000:]
    assert "missing Python modules: hjson" in broken.stderr, broken.stderr[-3000:]
    assert not (tmp_path / "broken" / "gpu_check.md").exists()
