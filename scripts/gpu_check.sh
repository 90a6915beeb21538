#!/usr/bin/env bash
# The GPU check, prepared for a CUDA machine (never executed by this project: it had no GPU):
#   scripts/gpu_check.sh                  # bf16 PILoT to 2:4 on SmolLM2-135M, 300 steps: 1 GPU, then FSDP2 on
#                                         # all visible GPUs; then 2:4 kernels (to_sparse_semi_structured) vs dense
#   scripts/gpu_check.sh --steps 500 --model HuggingFaceTB/SmolLM2-135M
#   scripts/gpu_check.sh --dry-run        # on CPU: a tiny model, gloo, everything but the CUDA kernels
# Prints one table; exits 1 on any mismatch, 2 if this machine cannot run it. Options: scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/gpu_check.py "$@"
