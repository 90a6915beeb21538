"""`pilot-hf finetune`: fine-tune an already sparse model without losing a single zero, fully or with LoRA.

Full mode (default): PILoTTrainer with method='finetune', sparsity=0, keep_zeros=True: every target weight
that is 0 at the start stays exactly 0 (re-applied after each optimizer step). With a dense teacher
(--teacher_model_name_or_path) it runs compress's recipe, LM loss + distillation; without one, the LM loss.
LoRA mode (--lora): PEFT adapters on the frozen sparse base, merged through its keep-mask
(`pilot_hf.lora.train_sparse_lora`): the merged model has exactly the base's zeros, N:M patterns included.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from transformers import default_data_collator

from ..data import DataArguments, prepare_lm_datasets
from ..distillation import Teacher, check_teacher_memory
from ..evaluation import EvalArguments
from ..loading import ModelArguments, base_model_id, check_model_source, load_model
from ..lora import FINETUNE_CARDS, FINETUNE_UNUSED_SETTINGS, check_sparse, count_zeros, train_sparse_lora
from ..patterns import detect_pattern
from ..runs import OutputFolder, peak_memory_bytes
from ..trainer import PILoTTrainer
from ..training_args import PILoTTrainingArguments
from ..wrapping import sparsity_report
from .arguments import FinetuneArguments, RunArguments
from .checkpoints import checkpoint_dir, refuse_stale_checkpoints, removed_if_empty, resolve_resume
from .parser import NO_COMMAND_LINE, CommandLine
from .report import finish, scores_before

HELP = ("Fine-tune an already sparse model keeping every zero exactly: full fine-tuning, or LoRA (--lora) "
        "merged through the keep-mask; evaluate and save.")
ARGUMENTS = (ModelArguments, DataArguments, EvalArguments, PILoTTrainingArguments, FinetuneArguments, RunArguments)
_LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "save_adapter")
_DISTILL_WEIGHTS = ("distill_logit_weight", "distill_feature_weight")

def finetune_training_args(args: PILoTTrainingArguments, ft_args: FinetuneArguments,
                           given: frozenset[str]) -> PILoTTrainingArguments:
    """The arguments of a fine-tuning run: method='finetune', sparsity=0, keep_zeros=True; distillation (the
    recipe) only with a teacher, else the LM loss. A user's other choice is refused (ValueError), never replaced."""
    wrong = [f"--{key} {getattr(args, key)}" for key, unused in (
        ("method", args.method != "finetune"), ("sparsity", args.sparsity != 0),
        ("sparsity_pattern", args.sparsity_pattern != "unstructured"), ("warm_start", args.warm_start is not None),
        ("recovery_steps", args.recovery_steps != 0), ("keep_zeros", not args.keep_zeros)) if key in given and unused]
    if wrong:
        raise ValueError(f"pilot-hf finetune keeps the model's own zeros and prunes nothing (method finetune, "
                         f"sparsity 0, keep_zeros), so {', '.join(wrong)} does not apply: drop it. To prune, use "
                         "`pilot-hf oneshot` or `pilot-hf compress` first, then fine-tune the result.")
    asked_for_ham = "ham" in given and args.ham  # else it follows sparsity 0: off
    if ft_args.lora:
        refused = [name for name, on in (("--weight_learning_rate", args.weight_learning_rate is not None),
                                         ("--tensorwise_second_moment", args.tensorwise_second_moment),
                                         ("--ham", asked_for_ham)) if on]  # HAM steps the target matrices, not adapters
        if refused:
            raise ValueError(f"--lora does not support {', '.join(refused)} (LoRA trains only the adapters, with "
                             "AdamW). Drop it, or fine-tune in full mode (without --lora), which supports it.")
    elif any(k in given for k in _LORA_ONLY):
        raise ValueError(f"{', '.join('--' + k for k in _LORA_ONLY if k in given)} only apply with --lora; add "
                         "--lora or drop them.")
    asked_to_distil = any(key in given and getattr(args, key) > 0 for key in _DISTILL_WEIGHTS)
    if asked_to_distil and not args.teacher_model_name_or_path:
        # The default teacher is the model as given, which here is the sparse model itself: no teacher at all.
        raise ValueError("distillation in pilot-hf finetune needs a dense teacher: the model given is already "
                         "sparse, so a copy of it would teach nothing. Add --teacher_model_name_or_path DENSE_MODEL "
                         "(the model before pruning, same tokenizer), or drop --distill_logit_weight / "
                         "--distill_feature_weight.")
    # Without a teacher, the LM loss alone (the user's lm_loss_weight if given).
    loss = {} if args.teacher_model_name_or_path else {
        "distill_logit_weight": 0.0, "distill_feature_weight": 0.0,
        "lm_loss_weight": args.lm_loss_weight if "lm_loss_weight" in given else 1.0}
    return args.with_method("finetune", sparsity=0.0, sparsity_pattern="unstructured", keep_zeros=True,
                            warm_start=None, recovery_steps=0, ham=asked_for_ham, **loss)


def run(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
        training_args: PILoTTrainingArguments, ft_args: FinetuneArguments, run_args: RunArguments,
        argv: CommandLine = NO_COMMAND_LINE) -> dict:
    started_at = time.perf_counter()
    is_main = training_args.process_index == 0
    checkpoints = checkpoint_dir(training_args.output_dir, run_args)
    output = OutputFolder(training_args.output_dir, run_args.overwrite_output_dir, is_main, checkpoints)
    training_args = finetune_training_args(training_args, ft_args, argv.given)
    check_model_source(model_args)
    data_args.check_sources()
    eval_args.check_sources()
    resume = resolve_resume(training_args.resume_from_checkpoint, checkpoints, plain=ft_args.lora)
    refuse_stale_checkpoints(resume, training_args, checkpoints, plain=ft_args.lora)
    check_teacher_memory(model_args.name, training_args, model_args.dtype, model_args.revision)
    config = training_args.pilot_config()
    with output, removed_if_empty(checkpoints, is_main):
        model, tokenizer = load_model(model_args)
        base_model = base_model_id(model_args, model)
        sparsity_before = check_sparse(model, config)
        zeros_before, _ = count_zeros(model, config)
        pattern = detect_pattern(model, config)
        lm_data = prepare_lm_datasets(data_args, tokenizer, model)
        dense = scores_before(model, tokenizer, eval_args, is_main)
        training_args.output_dir = str(checkpoints)
        data = dict(train_dataset=lm_data["train"], eval_dataset=lm_data.get("validation"), processing_class=tokenizer,
                    data_collator=default_data_collator)
        if ft_args.lora:
            teacher = Teacher.from_pretrained(training_args.teacher_model_name_or_path, training_args.teacher_dtype) \
                if training_args.distills else None
            model, trainer, train_output = train_sparse_lora(
                model, ft_args.lora_config(model, config), training_args, teacher=teacher, resume_from_checkpoint=resume,
                adapter_dir=output.staging / "adapter" if ft_args.save_adapter else None, **data)
            if is_main:
                model.save_pretrained(output.staging)
                tokenizer.save_pretrained(output.staging)
        else:
            trainer = PILoTTrainer(model=model, args=training_args, **data)
            train_output = trainer.train(resume_from_checkpoint=resume)
            trainer.save_model(str(output.staging))  # on every process: FSDP gathers the full state dict here
            model = trainer.model
            if is_main:
                (output.staging / "training_args.bin").unlink(missing_ok=True)
        peak_memory = peak_memory_bytes(training_args.device)
        training_args.output_dir = str(output.final)
        if is_main:
            report = sparsity_report(model, config)
            settings = {**trainer.args.run_settings(), "max_steps": trainer.state.max_steps, "method": "finetune",
                        "sparsity": sparsity_before, "sparsity_pattern": pattern, **ft_args.settings()}
            metrics = {"train": train_output.metrics, "mode": "lora" if ft_args.lora else "full",
                       "sparsity_before": sparsity_before, "sparsity_report_total": report["total"],
                       "zeros_before": zeros_before, "zeros_after": report["total"]["zeros"],
                       "sparsity_pattern": pattern, "world_size": training_args.world_size,
                       "tokens_trained": training_args.tokens_trained(trainer.state.global_step,
                                                                      len(lm_data["train"][0]["input_ids"])),
                       "peak_memory_bytes": peak_memory,
                       "note": "'dense' is the model as given (already sparse), before fine-tuning"}
            title, description = FINETUNE_CARDS[ft_args.lora]
            results = finish(
                output.staging, "finetune", argv, model, tokenizer, eval_args, started_at=started_at, before=dense,
                sparsity_report=report, settings=settings, metrics=metrics, card_title=title,
                card_settings={k: v for k, v in settings.items() if k not in FINETUNE_UNUSED_SETTINGS},
                inputs={"model": asdict(model_args), "data": asdict(data_args), "eval": asdict(eval_args),
                        "finetune": {**asdict(ft_args), **asdict(run_args)}},
                card={"base_model": base_model, "method_description": description,
                      "training_data": f"{data_args.dataset_name or data_args.train_file} (train split)",
                      "tags": ["finetune"] + (["lora"] if ft_args.lora else [])})
        trainer.accelerator.wait_for_everyone()
    if is_main:
        print(results.tables(output.final, checkpoints if checkpoints.is_dir() else None))
        return results.metrics
    return {}
