#!/usr/bin/env bash
# One prepared script for a lent GPU machine: install, then measure bf16 throughput and MFU.
# Run from the repository root: bash benchmarks/gpu_check.sh
set -euo pipefail
python3 -m pip install -q -e . 2>&1 | tail -2 || true
# 8 models x compile settings in at most 8 minutes: a run that would not finish in time stops and says so
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu_check.py "$@" || echo "gpu_check stopped (exit $?): see above"
