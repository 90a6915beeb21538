#!/usr/bin/env bash
# The test job: set up, then run the fast test suite (slow real-model tests: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check pilot_hf scripts tests
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
# pytest exits 5 when nothing was collected: that is a broken suite, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
