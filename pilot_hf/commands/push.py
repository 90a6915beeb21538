"""`pilot-hf push OUTPUT_DIR --repo_id NAMESPACE/NAME`: upload a result folder to the Hugging Face Hub."""

from __future__ import annotations

import sys
from dataclasses import asdict

from ..hub import PushError, push_to_hub
from .arguments import PushArguments

HELP = "Upload a pilot-hf output folder to the Hugging Face Hub."
ARGUMENTS = (PushArguments,)


def run(args: PushArguments, argv=(), api=None) -> int:
    """Prints what was (or would be) uploaded; a failed push prints its PushError and returns 1."""
    try:
        result = push_to_hub(api=api, **asdict(args))
    except PushError as err:
        print(f"pilot-hf push: error: {err}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0
