"""Wheels for a GPU machine with no network: what `benchmarks/gpu_check.sh` needs beyond the accelerator image.

The image holds Python 3.12 with a CUDA PyTorch, numpy, pyyaml, safetensors, psutil, ninja, einops, msgpack,
py-cpuinfo, tqdm, packaging and more (benchmarks/gpu_image.txt), but not DeepSpeed or pydantic. This fetches,
on a machine with the package registries, the versions installed here (the ones the tests ran with): binary
wheels for CPython 3.12 on manylinux x86_64, and DeepSpeed built here into a pure-Python wheel against the
torch installed here (its CUDA ops are compiled on first use, not at install). Usage: make gpu-bundle
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

# What the check imports that the image lacks. typing-extensions is in the image, but pydantic wants a
# newer one than an image may hold; the bundle's copy comes first on PYTHONPATH.
FETCHED = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "hjson"]
BUILT = ["deepspeed"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def pins(names: list[str]) -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def fetch(out: Path, python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(out),
                    *pins(FETCHED)], check=True)
    # --no-build-isolation: DeepSpeed's setup.py imports torch, the one installed here
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    *pins(BUILT)], check=True)


def manifest(out: Path) -> str:
    wheels = sorted(out.glob("*.whl"))
    rows = [f"{w.name}  {w.stat().st_size / 1e6:.2f} MB" for w in wheels]
    total = sum(w.stat().st_size for w in wheels) / 1e6
    return "\n".join([*rows, f"{len(wheels)} wheels, {total:.1f} MB"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".whl", help="folder for the wheels (emptied first)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: the image's)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    fetch(out, args.python_version)
    if any(not w.name.endswith("-none-any.whl") for w in out.glob("deepspeed-*.whl")):
        sys.exit("gpu_bundle: DeepSpeed built with compiled ops; set DS_BUILD_OPS=0 and run again")
    listing = manifest(out)
    (out / "MANIFEST.txt").write_text(listing)
    print(listing, end="")
    print(f"on the GPU machine, in the repository root with {out}/ in it: bash benchmarks/gpu_check.sh")


if __name__ == "__main__":
    main()
