"""`pilot-hf` command line: a thin layer over pilot_hf.pipeline, with Transformers' argument names.

    pilot-hf compress [--config run.yaml] [--model_name_or_path ...] [any TrainingArguments flag ...]
    pilot-hf oneshot  --method sparsegpt --sparsity 0.5 --output_dir out/
    pilot-hf evaluate --model_name_or_path out/
    pilot-hf sweep    --methods magnitude wanda sparsegpt --sparsities 0.5 0.7 2:4
    pilot-hf push     OUTPUT_DIR --repo_id ORG/NAME [--private] [--compressed] [--dry_run]

Values come from (later wins): the dataclass defaults, the demo defaults (only when no model is given),
the YAML file of --config, the command line. Unknown flags or YAML keys are errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .assets import DEMO_MODEL
from .data import DataArguments
from .pipeline import EvalArguments, ModelArguments, RunArguments, UserError

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
    "calibration_seqlen": 256,
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

COMMANDS = {
    "compress": "PILoT: train masks to a target sparsity, prune, merge, evaluate and save.",
    "oneshot": "One-shot pruning (magnitude, Wanda, SparseGPT), evaluate and save.",
    "evaluate": "Held-out perplexity of a model.",
    "sweep": "Methods x sparsities -> one table (CSV, JSON, Markdown) and a plot.",
    "push": "Upload a pilot-hf output folder to the Hugging Face Hub.",
}


def _dataclasses(command: str) -> tuple:
    from .training_args import PILoTTrainingArguments

    if command == "compress":
        return ModelArguments, DataArguments, EvalArguments, PILoTTrainingArguments, RunArguments
    if command == "oneshot":
        from .pipeline import OneShotArguments
        return ModelArguments, OneShotArguments, EvalArguments, RunArguments
    if command == "evaluate":
        from .pipeline import EvaluateArguments
        return ModelArguments, EvalArguments, EvaluateArguments
    if command == "sweep":
        from .sweep import SweepArguments
        return ModelArguments, EvalArguments, SweepArguments
    raise KeyError(command)


def parse(command: str, argv: list[str]) -> tuple:
    """Parse `argv` for `command` into its dataclasses: defaults < demo defaults < --config YAML < flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    classes = _dataclasses(command)
    parser = HfArgumentParser(classes, prog=f"pilot-hf {command}", description=COMMANDS[command])
    parser.allow_abbrev = False  # a misspelled flag must fail, not match a longer one
    parser.add_argument("--config", help="A YAML file of arguments (command-line flags override it).")
    for action in parser._actions:  # argparse formats help with %: a literal '%' must be doubled
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")
    dests = {f.name for cls in classes for f in fields(cls) if f.init}
    values: dict = {}
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file.")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: expected a mapping of argument names to values.")
        unknown = sorted(set(values) - dests)
        if unknown:
            raise UserError(f"--config {path}: unknown key(s) {unknown}. Keys are the flag names without '--' "
                            f"(see `pilot-hf {command} --help`).")
    given_model = values.get("model_name_or_path") or any(
        a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in rest)
    if command == "compress" and not given_model:
        values = {**DEMO_DEFAULTS, **values}
    elif command != "compress":
        values = {k: v for k, v in values.items() if k in dests}
    # YAML 1.1 reads an unquoted `no` / `yes` as a bool; for a field that takes a string (save_strategy: no)
    # give the word back.
    from transformers.hf_argparser import string_to_bool

    types = {a.dest: a.type for a in parser._actions}
    values = {k: ("yes" if v else "no") if isinstance(v, bool) and types.get(k) is not string_to_bool else v
              for k, v in values.items()}
    parser.set_defaults(**values)
    try:
        namespace, unknown = parser.parse_known_args(args=rest)
    except SystemExit as exit_:  # --help (code 0), or argparse already printed what was wrong
        if exit_.code:
            raise UserError("invalid arguments (see the message above).") from None
        raise
    if unknown:
        raise UserError(f"unknown argument(s) {unknown}. See `pilot-hf {command} --help` for the flags; "
                        "flag names use underscores, as in Transformers (e.g. --model_name_or_path).")
    try:
        return tuple(cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init}) for cls in classes)
    except ValueError as err:  # validation in the dataclasses' __post_init__
        raise UserError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:\n" + "\n".join(f"  {k:9} {v}" for k, v in COMMANDS.items()))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pilot-hf: unknown command {command!r}; choose one of {list(COMMANDS)}.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pilot_hf").setLevel(os.environ.get("PILOT_LOG_LEVEL", "INFO"))  # progress of long steps
    try:
        if command == "push":
            from .hub import main as push_main
            return push_main(rest)
        args = parse(command, rest)
        from . import pipeline
        if command == "compress":
            pipeline.compress(*args)
        elif command == "oneshot":
            pipeline.oneshot(*args)
        elif command == "evaluate":
            pipeline.evaluate(*args)
        else:
            from .sweep import sweep
            sweep(*args)
    except (UserError, ValueError) as err:  # bad input: one paragraph, no traceback (PILOT_DEBUG=1 shows it)
        if os.environ.get("PILOT_DEBUG"):
            raise
        print(f"pilot-hf {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
