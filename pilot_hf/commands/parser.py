"""The one parser of every `pilot-hf` subcommand: Transformers' `HfArgumentParser` over the command's dataclasses.

Values come from (later wins): the dataclass defaults (the recipe, shown by --help), the demo's model, data,
output folder and budget (`compress` without a model only), the YAML file of --config, the command line.
Unknown flags or YAML keys are errors; a YAML syntax error or a value of the wrong type is one paragraph, not
a traceback, and never echoes the file's text (it may hold a token).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..assets import DEMO_DEFAULTS


class UsageError(ValueError):
    """Bad command-line input; the message says what was wrong and how to fix it."""


def _redacted(text: str) -> str:
    from ..naming import redact  # lazily: `pilot-hf --help` should stay light
    return redact(text)


@dataclass(frozen=True)
class CommandLine:
    """What the user typed after the command name, and the argument names it set (as flags or --config keys)."""

    argv: tuple[str, ...] = ()
    given: frozenset[str] = frozenset()


NO_COMMAND_LINE = CommandLine()  # a command run from Python: nothing typed, nothing given


def _yaml_error(path: Path, err: yaml.YAMLError) -> UsageError:
    """Where and what, never the offending line itself (PyYAML quotes it; it may be `hub_token: hf_...`)."""
    mark = getattr(err, "problem_mark", None)
    what = "; ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return UsageError(_redacted(f"--config {path} is not valid YAML{where}: {what or type(err).__name__}. Fix that "
                                "line (quote values that hold ':' or '#')."))


def _read_config(path: Path, dests: set[str], command: str) -> dict:
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except UnicodeDecodeError:  # its message quotes no text
        raise UsageError(f"--config {path} is not UTF-8 text; save it as UTF-8.") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of argument names to values.")
    unknown = sorted(set(values) - dests)
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {unknown}. Keys are the flag names without '--' "
                         f"(see `pilot-hf {command} --help`).")
    return values


def _check_whole_numbers(values: dict, types: dict, path: str) -> None:
    """argparse converts only strings; a YAML float for an integer field would reach the dataclass as a float
    and fail late (after the model is loaded). Checked here, with the key named."""
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        if types.get(key) is int and any(isinstance(v, float) or isinstance(v, bool) for v in items):
            raise UsageError(f"--config {path}: {key} takes a whole number, got {value!r}. Write it without a "
                             "decimal point (e.g. 32).")


def build_parser(command: str, classes: tuple, description: str) -> HfArgumentParser:
    parser = HfArgumentParser(classes, prog=f"pilot-hf {command}", description=description)
    parser.allow_abbrev = False  # a misspelled flag must fail, not match a longer one
    parser.add_argument("--config", help="A YAML file of arguments (command-line flags override it).")
    for action in parser._actions:
        if action.help and "%" in action.help and "%(" not in action.help:  # argparse formats help with %
            action.help = action.help.replace("%", "%%")
        if action.type is string_to_bool and action.nargs is None:  # a bool defaulting to None (chosen later):
            action.nargs, action.const = "?", True                   # a bare --flag means true, as for other bools
    return parser


def _flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags present in argv, by the parser's own table (so --model-name-or-path counts)."""
    table = parser._option_string_actions
    return {table[flag].dest for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--")) if flag in table}


def parse(command: str, argv: list[str], classes: tuple, description: str = "") -> tuple:
    """`argv` -> one instance of each of `classes` (see `parse_command_line`)."""
    return parse_command_line(command, argv, classes, description)[0]


def parse_command_line(command: str, argv: list[str], classes: tuple, description: str = "") -> tuple[tuple, CommandLine]:
    """`argv` -> (one instance of each of `classes`, the CommandLine): defaults < demo < --config YAML < flags."""
    def error(message):  # instead of argparse's usage (hundreds of TrainingArguments flags) and exit
        raise UsageError(f"{_redacted(message)}. See `pilot-hf {command} --help` for the flags.")

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.error = error
    known, rest = pre.parse_known_args(argv)
    if command == "compress":
        demo = ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items())
        description = f"{description} Without --model_name_or_path it runs the demo: the defaults below with {demo}."
    parser = build_parser(command, classes, description)
    parser.error = error
    dests = {f.name for cls in classes for f in fields(cls) if f.init}
    values = _read_config(Path(known.config), dests, command) if known.config else {}
    types = {a.dest: a.type for a in parser._actions}
    _check_whole_numbers(values, types, known.config)
    flags = _flags_given(parser, rest)
    given = frozenset(set(values) | flags)
    # --help shows the defaults a user's own model gets; the demo's choices are named in the description.
    wants_help = any(a in ("-h", "--help") for a in rest)
    if command == "compress" and "model_name_or_path" not in given and not wants_help:
        values = {**DEMO_DEFAULTS, **values}
    # YAML 1.1 reads an unquoted `no` / `yes` as a bool; for a field that takes a string (save_strategy: no)
    # give the word back.
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
    if unknown:  # a token given to a command that takes none is never echoed
        from ..naming import redact_argv

        raise UsageError(f"unknown argument(s) {redact_argv(unknown)}. See `pilot-hf {command} --help` for the flags; "
                         "flag names use underscores, as in Transformers (e.g. --model_name_or_path).")
    try:
        arguments = tuple(cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init})
                          for cls in classes)
    except (ValueError, TypeError) as err:  # validation in the dataclasses' __post_init__
        raise UsageError(_redacted(str(err))) from err
    return arguments, CommandLine(tuple(argv), given)
