#!/usr/bin/env bash
# The one prepared device check of issue 16: run from the repository root on the GPU machine.
# It needs nothing installed beyond torch, safetensors, click, rich, numpy, huggingface_hub, peft,
# transformers and pytest (the GPU image has them); loratool runs from this checkout.
# Prints one table and every failure; exit 1 when anything failed. About 6 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 tests/perf/device_check.py "$@"
