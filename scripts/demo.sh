#!/usr/bin/env bash
# The main job: set up, then compress the real SmolLM2-135M on built-in offline text (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/pilot-hf compress "$@"
