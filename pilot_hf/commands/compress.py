"""`pilot-hf compress`: PILoT (or an ablation) from a model to a sparse checkpoint, evaluated, in one folder."""

from __future__ import annotations

import time
from dataclasses import asdict

from transformers import default_data_collator

from ..data import DataArguments, prepare_lm_datasets
from ..distillation import check_teacher_memory
from ..evaluation import EvalArguments
from ..loading import ModelArguments, base_model_id, check_model_source, load_model
from ..runs import OutputFolder
from ..trainer import PILoTTrainer
from ..training_args import PILoTTrainingArguments
from .arguments import RunArguments
from .checkpoints import checkpoint_dir, refuse_stale_checkpoints, removed_if_empty, resolve_resume
from .parser import NO_COMMAND_LINE, CommandLine
from .report import finish, scores_before

HELP = "PILoT: train masks to a target sparsity, prune, merge, evaluate and save."
ARGUMENTS = (ModelArguments, DataArguments, EvalArguments, PILoTTrainingArguments, RunArguments)


def run(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
        training_args: PILoTTrainingArguments, run_args: RunArguments, argv: CommandLine = NO_COMMAND_LINE) -> dict:
    started_at = time.perf_counter()
    is_main = training_args.process_index == 0
    checkpoints = checkpoint_dir(training_args.output_dir, run_args)
    # Everything that can be checked is checked before the model is loaded.
    output = OutputFolder(training_args.output_dir, run_args.overwrite_output_dir, is_main, checkpoints)
    check_model_source(model_args)
    data_args.check_sources()
    eval_args.check_sources()
    resume = resolve_resume(training_args.resume_from_checkpoint, checkpoints)
    refuse_stale_checkpoints(resume, training_args, checkpoints)
    check_teacher_memory(model_args.name, training_args, model_args.dtype, model_args.revision)
    with output, removed_if_empty(checkpoints, is_main):
        model, tokenizer = load_model(model_args)
        base_model = base_model_id(model_args, model)
        PILoTTrainer.check_pattern(model, training_args)
        lm_data = prepare_lm_datasets(data_args, tokenizer, model)
        dense = scores_before(model, tokenizer, eval_args, is_main)
        training_args.output_dir = str(checkpoints)  # Trainer writes its checkpoints into its output_dir
        # Packed blocks all have block_size tokens: stack them, no padding (tokenizers may have no pad token).
        trainer = PILoTTrainer(model=model, args=training_args, train_dataset=lm_data["train"],
                               eval_dataset=lm_data.get("validation"), processing_class=tokenizer,
                               data_collator=default_data_collator)
        # The one-shot start the run began from (the teacher was copied before it), scored once, before training.
        start = None
        if training_args.warm_start:
            one_shot = scores_before(trainer.model, tokenizer, eval_args, is_main, tasks=False)
            start = (training_args.warm_start, one_shot) if one_shot else None
        train_output = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(output.staging))  # on every process: FSDP gathers the full state dict here
        training_args.output_dir = str(output.final)
        if is_main:
            (output.staging / "training_args.bin").unlink(missing_ok=True)  # the result: safetensors and JSON
            tokens = training_args.tokens_trained(trainer.state.global_step, len(lm_data["train"][0]["input_ids"]))
            metrics = {"train": train_output.metrics, "sparsity_report_total": trainer.sparsity_report["total"],
                       "alpha_history": trainer.controller.history, "world_size": training_args.world_size,
                       "tokens_trained": tokens}
            results = finish(
                output.staging, "compress", argv, trainer.model, tokenizer, eval_args, started_at=started_at,
                before=dense, start=start, sparsity_report=trainer.sparsity_report, metrics=metrics,
                settings={**trainer.args.run_settings(), "max_steps": trainer.state.max_steps},
                inputs={"model": asdict(model_args), "data": asdict(data_args), "eval": asdict(eval_args)},
                card={"base_model": base_model,
                      "training_data": f"{data_args.dataset_name or data_args.train_file} (train split)"})
        trainer.accelerator.wait_for_everyone()
    if is_main:
        print(results.tables(output.final, checkpoints if checkpoints.is_dir() else None))
        return results.metrics
    return {}
