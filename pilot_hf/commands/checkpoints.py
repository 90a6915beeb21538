"""Where a training command keeps its Trainer checkpoints, and which one --resume_from_checkpoint means."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..runs import checkpoint_problem, latest_checkpoint
from .arguments import RunArguments


def checkpoint_dir(output_dir: str, run_args: RunArguments) -> Path:
    final = Path(output_dir).expanduser().resolve()
    return Path(run_args.checkpoint_dir).expanduser().resolve() if run_args.checkpoint_dir else \
        final.with_name(final.name + "-checkpoints")


@contextlib.contextmanager
def removed_if_empty(folder: Path, is_main: bool):
    """Trainer creates its output folder (our checkpoint_dir) even when it saves nothing there (save_strategy
    'no', or a run that stops early): an empty one it made is removed, however the run ends."""
    existed = folder.exists()
    try:
        yield
    finally:
        if is_main and not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def resolve_resume(value: str | None, checkpoints: Path, plain: bool = False) -> str | None:
    """--resume_from_checkpoint: a path, or true for the latest complete checkpoint in checkpoint_dir. `plain`:
    a plain Trainer's checkpoints (LoRA: no pilot_state.json)."""
    if value is None or str(value).lower() == "false":
        return None
    if plain:
        resume = _latest(checkpoints, plain) if str(value).lower() == "true" else str(value)
        if resume is None or not Path(resume).is_dir():
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint found (looked in {checkpoints}). "
                             "Give a checkpoint-* folder, or start without --resume_from_checkpoint.")
        return resume
    if str(value).lower() == "true":
        latest = latest_checkpoint(checkpoints)
        if latest is None:
            raise ValueError(f"--resume_from_checkpoint true: {checkpoints} holds no complete checkpoint. Give a "
                             "checkpoint folder, or start without --resume_from_checkpoint.")
        return latest
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value}: no such folder. Give a checkpoint-* folder, or true "
                         f"for the latest complete one in {checkpoints}.")
    problem = checkpoint_problem(value)
    if problem:  # an interrupted save, a file cut short, or not a checkpoint: refused before the model is loaded
        intact = latest_checkpoint(Path(value).resolve().parent) or latest_checkpoint(checkpoints)
        raise ValueError(f"--resume_from_checkpoint {value} is not a complete checkpoint ({problem}). "
                         + (f"Resume from {intact}, the latest complete checkpoint."
                            if intact else "Start without --resume_from_checkpoint."))
    return value


def _latest(checkpoints: Path, plain: bool) -> str | None:
    if not plain:
        return latest_checkpoint(checkpoints)
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def refuse_stale_checkpoints(resume: str | None, training_args, checkpoints: Path, plain: bool = False) -> None:
    """A fresh run that saves checkpoints into a folder holding an earlier run's would overwrite them step by
    step and mix the two in one folder: refused."""
    latest = _latest(checkpoints, plain)
    if resume is None and str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no" \
            and latest is not None:
        raise ValueError(f"checkpoint_dir {checkpoints} holds the checkpoints of an earlier run. Resume it with "
                         "--resume_from_checkpoint true, or give another --checkpoint_dir (or move that folder "
                         "away) to start a new run.")
