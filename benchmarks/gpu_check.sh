#!/usr/bin/env bash
# One prepared script for a lent GPU machine: install, then measure bf16 throughput and MFU.
# Run from the repository root: bash benchmarks/gpu_check.sh
set -euo pipefail
python3 -m pip install -q -e . 2>&1 | tail -2 || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "$@"
