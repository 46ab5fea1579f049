#!/usr/bin/env bash
# The GPU check rehearsed on this CPU machine, with no package index: what the GPU machine will do, but here.
#  1. The bundle for the image's Python 3.12 (make gpu-bundle) installs with --no-index --no-deps into a bare
#     Python 3.12 and its modules import. (No CPU build of torch for 3.12 is on the registries this machine
#     reaches, so DeepSpeed, which imports torch, is checked in step 2.)
#  2. An environment holding only a CPU torch and the image's other packages (benchmarks/gpu_image.txt, less
#     what the image lacks) runs benchmarks/gpu_check.sh, the GPU machine's own command, with the same bundle
#     built for its Python, for a few steps of a tiny shape on the CPU.
# Run from the repository root: bash benchmarks/gpu_rehearsal.sh (REHEARSAL_DIR: its folder, kept for reuse).
set -euo pipefail
WORK=${REHEARSAL_DIR:-build/gpu-rehearsal}
PY=${PY:-.venv/bin/python}                 # the project's environment: the versions the bundle pins
CPU_PYTHON=${CPU_PYTHON:-python3}          # a Python that the CPU torch wheel installs on
TORCH=${TORCH:-torch==2.13.0}              # as in the Makefile: a CPU build (e.g. with a CPU wheel index)
mkdir -p "$WORK"

py312=""  # python3.12 on PATH, else pyenv's
for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$candidate" -V >/dev/null 2>&1; then py312=$candidate; break; fi
done
if [ -z "$py312" ]; then echo "gpu_rehearsal: no Python 3.12 found" >&2; exit 3; fi

echo "== 1. the Python 3.12 bundle, offline, in a bare $("$py312" -V)"
"$PY" benchmarks/gpu_bundle.py --out "$WORK/bundle-3.12"
rm -rf "$WORK/site-3.12" && "$py312" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site-3.12" \
    "$WORK"/bundle-3.12/*.whl
PYTHONPATH="$WORK/site-3.12" "$py312" -I -c "import sys; sys.path[:0] = ['$WORK/site-3.12']
import annotated_types, hjson, pydantic, pydantic_core, typing_inspection
class Check(pydantic.BaseModel):
    steps: int
assert Check(steps='3').steps == 3
print('imports and validates:', 'pydantic', pydantic.VERSION, 'hjson', hjson.__version__)"

echo "== 2. gpu_check.sh on the CPU, in an environment like the image"
env="$WORK/image-env"
if [ ! -f "$env/.ready" ]; then
    rm -rf "$env" && "$CPU_PYTHON" -m venv "$env"
    "$env/bin/pip" install -q $TORCH
    "$env/bin/pip" install -q -r benchmarks/gpu_image.txt
    # the image has none of these; here they can arrive as other packages' dependencies
    "$env/bin/pip" uninstall -q -y pydantic pydantic-core annotated-types typing-inspection hjson deepspeed
    touch "$env/.ready"
fi
version=$("$env/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PY" benchmarks/gpu_bundle.py --out "$WORK/bundle-$version" --python-version "$version"
PYTHON="$env/bin/python" BUNDLE="$WORK/bundle-$version" SITE="$WORK/site-$version" OUT="$WORK" \
    bash benchmarks/gpu_check.sh --device cpu --models cpu-26k --steps 4 --log-every 2 --seq-len 64 --micro-batch 2 \
    --compile off
