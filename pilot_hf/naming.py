"""Two rules about the strings a run carries, each in one place: what a Hugging Face Hub id is
(`hub_id_error`, `is_hub_id`: huggingface_hub's own `validate_repo_id`), and how tokens are hidden in text
and in argv (`redact`, `redact_argv`) before anything is printed, recorded or put in a model card."""

from __future__ import annotations

import re

from huggingface_hub.utils import validate_repo_id

REDACTED = "<redacted>"
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{10,}")  # anything shaped like a Hugging Face token
_TOKEN_FLAG = r"--(?:hub[_-])?token"  # --token, --hub_token, --hub-token (HfArgumentParser takes both spellings)
_TOKEN_FLAG_ARG = re.compile(rf"^({_TOKEN_FLAG})(=.*)?$")
_SECRETS = [
    (_TOKEN, REDACTED),
    (re.compile(rf"({_TOKEN_FLAG}[= ])\S+"), rf"\1{REDACTED}"),
    (re.compile(r"(HF_TOKEN=)\S+"), rf"\1{REDACTED}"),
]


def hub_id_error(name, namespace: bool = False) -> str | None:
    """Why `name` is no Hub model id (None if it is one): huggingface_hub's rule ('name' or 'namespace/name',
    letters, digits, '-', '_', '.', at most 96 characters, no '--' or '..', not ending in '.git'); with
    `namespace`, exactly 'namespace/name'."""
    if not isinstance(name, str) or (namespace and name.count("/") != 1):
        return "it must be exactly 'namespace/name'" if namespace else "it must be 'name' or 'namespace/name'"
    try:
        validate_repo_id(name)
    except ValueError as err:  # HFValidationError
        return str(err)
    return None


def is_hub_id(name, namespace: bool = False) -> bool:
    return hub_id_error(name, namespace) is None


def redact(text: str) -> str:
    """`text` with Hugging Face tokens (and --token / --hub_token / HF_TOKEN= values) replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def redact_argv(argv: list[str]) -> list[str]:
    """argv with token values (after --hub_token/--token, or anything shaped like an hf_ token) replaced."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        match = _TOKEN_FLAG_ARG.match(arg)
        if match:
            out.append(f"{match.group(1)}={REDACTED}" if match.group(2) else arg)
            hide_next = not match.group(2)
            continue
        out.append(redact(arg))
    return out
