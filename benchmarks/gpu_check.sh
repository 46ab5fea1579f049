#!/usr/bin/env bash
# The one command for a lent GPU machine, which has no network: install the offline bundle that `make gpu-bundle`
# wrote to .whl/ (no index, no dependencies, nothing else), check every import, then measure within 8 minutes.
# Run from the repository root: bash benchmarks/gpu_check.sh [benchmarks/gpu_check.py options]
# BUNDLE (default .whl), SITE (where the bundle is installed) and PYTHON (default python3) may be set.
set -euo pipefail
BUNDLE=${BUNDLE:-.whl}
SITE=${SITE:-/tmp/isoflop-site}
PYTHON=${PYTHON:-python3}
if ! compgen -G "$BUNDLE/*.whl" >/dev/null; then
    echo "gpu_check: no wheels in $BUNDLE/: run 'make gpu-bundle' on a machine with the package registries" >&2
    exit 2
fi
rm -rf "$SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/*.whl
# the bundle first (its typing-extensions may be newer than the image's), then the repository itself
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
table=${OUT:+$OUT/gpu_check.md}
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py --table "${table:-results/gpu_check.md}" "$@"
