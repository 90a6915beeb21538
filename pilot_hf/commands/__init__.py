"""`pilot-hf`: one module per subcommand, each a thin layer over the public API, all parsed by one parser.

    pilot-hf compress [--config run.yaml] [--model_name_or_path ...] [any TrainingArguments flag ...]
    pilot-hf oneshot  --method sparsegpt --sparsity 0.5 --output_dir out/
    pilot-hf finetune --model_name_or_path out/ --train_file text.txt [--lora] --output_dir tuned/
    pilot-hf evaluate --model_name_or_path out/ [--eval_dataset_name wikitext --eval_dataset_config_name
                      wikitext-2-raw-v1] [--tasks zeroshot7 | pilot_kjv_next_verse]
    pilot-hf sweep    --methods magnitude wanda sparsegpt --sparsities 0.5 0.7 2:4
    pilot-hf push     OUTPUT_DIR --repo_id ORG/NAME [--private] [--compressed] [--dry_run]

Exit codes: 0 done; 1 a failure that is not the input's fault (e.g. the Hub refused a push); 2 bad input or
environment (one paragraph says what and how to fix it; PILOT_DEBUG=1 shows the traceback); 130 / 143
interrupted by Ctrl-C / SIGTERM (what was kept is named).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

from .parser import CommandLine, UsageError, parse, parse_command_line

__all__ = ["COMMANDS", "CommandLine", "UsageError", "command_module", "main", "parse", "parse_command_line"]

COMMANDS = ("compress", "oneshot", "finetune", "evaluate", "sweep", "push")


class Interrupted(BaseException):
    """SIGTERM, raised where the run is, so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def command_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pilot-hf: unknown command {command!r}; choose one of {list(COMMANDS)}.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pilot_hf").setLevel(os.environ.get("PILOT_LOG_LEVEL", "INFO"))  # progress of long steps
    if command == "push" and rest and not rest[0].startswith("-"):  # OUTPUT_DIR as a positional argument
        rest = ["--output_dir", rest[0], *rest[1:]]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        module = command_module(command)
        args, command_line = parse_command_line(command, rest, module.ARGUMENTS, module.HELP)
        result = module.run(*args, argv=command_line)
        return result if isinstance(result, int) else 0
    except (UsageError, ValueError, OSError) as err:  # bad input: one paragraph (PILOT_DEBUG=1: traceback)
        if os.environ.get("PILOT_DEBUG"):
            raise
        print(f"pilot-hf {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pilot-hf {command}: interrupted (Ctrl-C); see the line above for what was kept.", file=sys.stderr)
        return 130
    except Interrupted:
        print(f"pilot-hf {command}: terminated (SIGTERM); see the line above for what was kept.", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
