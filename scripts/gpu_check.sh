#!/usr/bin/env bash
# The GPU check (issue 23): the service on the GPU in bf16 against a naive loop, a short full fine-tune
# of the real backbone without and with FSDP on one rank, and CUDA bf16 rewards against CPU fp32.
# Writes one JSON (default gpu_check.json). Under 5 minutes on one GPU.
#
#   scripts/gpu_check.sh                          # on a machine with a GPU
#   scripts/gpu_check.sh --device cpu --out dry.json   # the dry run on a CPU (small sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" scripts/gpu_check.py "$@"
