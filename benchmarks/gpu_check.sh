#!/usr/bin/env bash
# The GPU check, for any CUDA machine with cir-bench installed and this checkout: the CUDA tests,
# Backward Search's engines, the SynthArt model, `cir-bench serve` with serve/config.gpu.yaml under
# `cir-bench loadtest`, and a report, within a time budget (default 8 min); every result as JSON
# in one folder, exit 0 only if every stage ran (benchmarks/gpu_check.py says what each file holds).
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget-s 480]
#   bash benchmarks/gpu_check.sh --device cpu --quick --out DIR    # a dry run of every stage on the CPU
# Python: $PYTHON, else the checkout's .venv, else python3.
set -eu
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
