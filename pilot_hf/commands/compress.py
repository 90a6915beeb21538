"""`pilot-hf compress`: PILoT (or an ablation) from a model to a sparse checkpoint, evaluated, in one folder."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

from transformers import default_data_collator

from ..data import DataArguments, prepare_lm_datasets
from ..evaluation import EvalArguments, evaluate_model, evaluate_model_tasks
from ..loading import ModelArguments, base_model_id, check_model_source, load_model
from ..runs import OutputFolder, checkpoint_problem, latest_checkpoint, write_json
from ..trainer import PILoTTrainer
from ..training_args import PILoTTrainingArguments
from .arguments import RunArguments
from .report import card_results, card_task_results, run_record, summary_table, task_table

HELP = "PILoT: train masks to a target sparsity, prune, merge, evaluate and save."
ARGUMENTS = (ModelArguments, DataArguments, EvalArguments, PILoTTrainingArguments, RunArguments)


def checkpoint_dir(training_args: PILoTTrainingArguments, run_args: RunArguments) -> Path:
    final = Path(training_args.output_dir).expanduser().resolve()
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


def resolve_resume(value: str | None, checkpoints: Path) -> str | None:
    """--resume_from_checkpoint: a path, or true for the latest complete checkpoint in checkpoint_dir."""
    if value is None or str(value).lower() == "false":
        return None
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


def refuse_stale_checkpoints(resume, training_args, latest: str | None, checkpoints: Path) -> None:
    """A fresh run that saves checkpoints into a folder holding an earlier run's would overwrite them step by
    step and mix the two in one folder: refused."""
    if resume is None and str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no" \
            and latest is not None:
        raise ValueError(f"checkpoint_dir {checkpoints} holds the checkpoints of an earlier run. Resume it with "
                         "--resume_from_checkpoint true, or give another --checkpoint_dir (or move that folder "
                         "away) to start a new run.")


def run(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
        training_args: PILoTTrainingArguments, run_args: RunArguments, argv: list[str] = ()) -> dict:
    start = time.perf_counter()
    is_main = training_args.process_index == 0
    checkpoints = checkpoint_dir(training_args, run_args)
    # Everything that can be checked is checked before the model is loaded.
    output = OutputFolder(training_args.output_dir, run_args.overwrite_output_dir, is_main, checkpoints)
    check_model_source(model_args)
    data_args.check_sources()
    eval_args.check_sources()
    resume = resolve_resume(training_args.resume_from_checkpoint, checkpoints)
    refuse_stale_checkpoints(resume, training_args, latest_checkpoint(checkpoints), checkpoints)
    with output, removed_if_empty(checkpoints, is_main):
        model, tokenizer = load_model(model_args)
        base_model = base_model_id(model_args, model)
        PILoTTrainer.check_pattern(model, training_args)
        lm_data = prepare_lm_datasets(data_args, tokenizer, model)
        dense = None if eval_args.skip_dense_eval or not is_main else evaluate_model(model, tokenizer, eval_args)
        dense_tasks = None if eval_args.skip_dense_eval or not is_main else \
            evaluate_model_tasks(model, tokenizer, eval_args)
        training_args.output_dir = str(checkpoints)  # Trainer writes its checkpoints into its output_dir
        # Packed blocks all have block_size tokens: stack them, no padding (tokenizers may have no pad token).
        trainer = PILoTTrainer(model=model, args=training_args, train_dataset=lm_data["train"],
                               eval_dataset=lm_data.get("validation"), processing_class=tokenizer,
                               data_collator=default_data_collator)
        train_output = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(output.staging))  # on every process: FSDP gathers the full state dict here
        training_args.output_dir = str(output.final)
        if is_main:
            (output.staging / "training_args.bin").unlink(missing_ok=True)  # the result: safetensors and JSON
            sparse = evaluate_model(trainer.model, tokenizer, eval_args)
            sparse_tasks = evaluate_model_tasks(trainer.model, tokenizer, eval_args)
            tokens = (trainer.state.global_step * training_args.train_batch_size * training_args.world_size
                      * training_args.gradient_accumulation_steps * len(lm_data["train"][0]["input_ids"]))
            metrics = {"train": train_output.metrics, "sparsity_report_total": trainer.sparsity_report["total"],
                       "alpha_history": trainer.controller.history, "world_size": training_args.world_size,
                       "dense": dense, "sparse": sparse, "elapsed_s": time.perf_counter() - start,
                       "tokens_trained": tokens,
                       **({"tasks": {"dense": dense_tasks, "sparse": sparse_tasks}} if eval_args.tasks else {})}
            record = run_record("compress", argv, model=asdict(model_args), data=asdict(data_args),
                                eval=asdict(eval_args),
                                settings={**training_args.run_settings(), "max_steps": trainer.state.max_steps})
            write_json(output.staging / "sparsity_report.json", trainer.sparsity_report)
            write_json(output.staging / "metrics.json", metrics)
            write_json(output.staging / "run_config.json", record)
            from ..hub import write_model_card

            write_model_card(output.staging, trainer.card_info(
                results=card_results(dense, sparse), base_model=base_model, command=record["command"],
                task_results=card_task_results(dense_tasks, sparse_tasks),
                training_data=f"{data_args.dataset_name or data_args.train_file} (train split)"))
        trainer.accelerator.wait_for_everyone()
    if is_main:
        if sparse_tasks:
            print(task_table(dense_tasks, sparse_tasks))
        print(summary_table(dense, sparse, trainer.sparsity_report["total"]["sparsity"], output.final,
                            time.perf_counter() - start, checkpoints if checkpoints.is_dir() else None))
        return metrics
    return {}
