"""`pilot-hf sweep`: methods x sparsities -> one table (CSV, JSON, Markdown) and a plot."""

from __future__ import annotations

from pathlib import Path

from ..data import DataArguments
from ..evaluation import EvalArguments
from ..loading import ModelArguments, check_model_source
from ..sweep import SweepArguments, sweep
from ..training_args import PILoTTrainingArguments

HELP = "Methods x sparsities -> one table (CSV, JSON, Markdown) and a plot; resumable."
ARGUMENTS = (ModelArguments, DataArguments, EvalArguments, PILoTTrainingArguments, SweepArguments)


def run(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
        training_args: PILoTTrainingArguments, grid: SweepArguments, argv=()) -> list[dict]:
    out = Path(training_args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; give a folder path (it is created if needed).")
    check_model_source(model_args)
    if any(spec.trained for spec in grid.specs) and training_args.max_steps < 1:  # before the folder is made
        raise ValueError("the sweep's trained methods need a fixed budget: give max_steps ≥ 1 (the same for every "
                         "trained cell).")
    data_args.check_sources()
    eval_args.check_sources()
    results = sweep(model_args, data_args, eval_args, training_args, grid)
    print(f"{len(results)} cells; table: {training_args.output_dir}/results.md")
    return results
