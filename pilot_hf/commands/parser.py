"""The one parser of every `pilot-hf` subcommand: Transformers' `HfArgumentParser` over the command's dataclasses.

Values come from (later wins): the dataclass defaults, the demo defaults (`compress` without a model only),
the YAML file of --config, the command line. Unknown flags or YAML keys are errors; a YAML syntax error or
a value of the wrong type is one paragraph, not a traceback.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..assets import DEMO_MODEL


class UsageError(ValueError):
    """Bad command-line input; the message says what was wrong and how to fix it."""


# The main job: SmolLM2-135M on built-in offline text to 50% sparsity, in minutes on 2 CPU cores.
# configs/demo_cpu.yaml holds the same values (a test keeps them equal).
DEMO_DEFAULTS = {
    "model_name_or_path": DEMO_MODEL,
    "dataset_name": "builtin:kjv",
    "block_size": 256,
    "validation_split_percentage": 0.0,
    "output_dir": "outputs/smollm2-135m-pilot-50",
    "sparsity": 0.5,
    "warm_start": "wanda",
    "num_calibration_samples": 16,
    "max_steps": 24,
    "recovery_steps": 8,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-4,
    "mask_learning_rate": 1e-3,
    "alpha_init": 1e-4,
    "alpha_update_interval": 4,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "logging_steps": 4,
    "save_strategy": "no",
    "report_to": "none",
    "eval_texts": ["kjv", "pydoc"],
    "eval_max_tokens": 6144,
    "use_cpu": True,
}


def _read_config(path: Path, dests: set[str], command: str) -> dict:
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of argument names to values.")
    unknown = sorted(set(values) - dests)
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {unknown}. Keys are the flag names without '--' "
                         f"(see `pilot-hf {command} --help`).")
    return values


def build_parser(command: str, classes: tuple, description: str) -> HfArgumentParser:
    parser = HfArgumentParser(classes, prog=f"pilot-hf {command}", description=description)
    parser.allow_abbrev = False  # a misspelled flag must fail, not match a longer one
    parser.add_argument("--config", help="A YAML file of arguments (command-line flags override it).")
    for action in parser._actions:  # argparse formats help with %: a literal '%' must be doubled
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")
    return parser


def parse(command: str, argv: list[str], classes: tuple, description: str = "") -> tuple:
    """`argv` -> one instance of each of `classes`: defaults < demo defaults < --config YAML < flags."""
    def error(message):  # instead of argparse's usage (hundreds of TrainingArguments flags) and exit
        raise UsageError(f"{message}. See `pilot-hf {command} --help` for the flags.")

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.error = error
    known, rest = pre.parse_known_args(argv)
    parser = build_parser(command, classes, description)
    parser.error = error
    dests = {f.name for cls in classes for f in fields(cls) if f.init}
    values = _read_config(Path(known.config), dests, command) if known.config else {}
    given_model = values.get("model_name_or_path") or any(  # HfArgumentParser takes the dashed spelling too
        a.split("=", 1)[0] in ("--model_name_or_path", "--model-name-or-path") for a in rest)
    if command == "compress" and not given_model:
        values = {**DEMO_DEFAULTS, **values}
    # YAML 1.1 reads an unquoted `no` / `yes` as a bool; for a field that takes a string (save_strategy: no)
    # give the word back.
    types = {a.dest: a.type for a in parser._actions}
    values = {k: ("yes" if v else "no") if isinstance(v, bool) and types.get(k) is not string_to_bool else v
              for k, v in values.items()}
    parser.set_defaults(**values)
    for action in parser._actions:  # a required flag given in the YAML file is given
        if action.dest in values:
            action.required = False
    try:
        namespace, unknown = parser.parse_known_args(args=rest)
    except SystemExit as exit_:  # --help (code 0)
        if exit_.code:
            raise UsageError("invalid arguments (see the message above).") from None
        raise
    if unknown:
        from ..runs import redact_argv  # a token given to a command that takes none is never echoed

        raise UsageError(f"unknown argument(s) {redact_argv(unknown)}. See `pilot-hf {command} --help` for the flags; "
                         "flag names use underscores, as in Transformers (e.g. --model_name_or_path).")
    try:
        return tuple(cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init}) for cls in classes)
    except (ValueError, TypeError) as err:  # validation in the dataclasses' __post_init__
        raise UsageError(str(err)) from err
