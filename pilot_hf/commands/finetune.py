"""`pilot-hf finetune`: fine-tune an already sparse model without losing a single zero, fully or with LoRA.

Full mode (default): PILoTTrainer with method='finetune', sparsity=0, keep_zeros=True: every target weight
that is 0 at the start stays exactly 0 (re-applied after each optimizer step); distillation is available.
LoRA mode (--lora): PEFT LoRA adapters on the frozen sparse base, trained with a plain transformers.Trainer,
then merged through the base's keep-mask (`pilot_hf.lora.merge_sparse_lora`): the merged model has exactly
the base's zeros, N:M patterns included. --save_adapter also writes the adapter (`adapter/`, loadable with
`PeftModel.from_pretrained(base, folder)`; note that base + adapter unmerged is not sparse-merged).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import default_data_collator

from ..data import DataArguments, prepare_lm_datasets
from ..evaluation import EvalArguments, evaluate_model, evaluate_model_tasks
from ..hub import card_info_for_run, write_model_card
from ..loading import ModelArguments, base_model_id, check_model_source, load_model
from ..lora import check_sparse, count_zeros, merge_sparse_lora, prepare_sparse_lora, sparse_lora_config
from ..runs import OutputFolder, peak_memory_bytes, write_json
from ..training_args import PILoTTrainingArguments
from ..wrapping import find_target_layers, out_in_layout, sparsity_report
from .compress import checkpoint_dir, refuse_stale_checkpoints, removed_if_empty, resolve_resume
from .report import card_results, card_task_results, run_record, summary_table, task_table

HELP = ("Fine-tune an already sparse model keeping every zero exactly: full fine-tuning, or LoRA (--lora) "
        "merged through the keep-mask; evaluate and save.")


@dataclass
class FinetuneArguments:
    """How to fine-tune (full or LoRA), where checkpoints go, and whether an earlier result may be replaced."""

    lora: bool = field(default=False, metadata={
        "help": "Train LoRA adapters on the frozen sparse model (PEFT) and merge them through its keep-mask, "
                "W + (B·A·scaling) ⊙ (W ≠ 0), so the result has exactly the model's zeros. Default: full fine-tuning "
                "with the zeros held at 0."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input (with --lora)."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Layers that get adapters, by name or suffix (PEFT's rule). Default: the layers pilot-hf sparsifies "
                "(every linear layer of the decoder blocks, or --target_modules)."})
    save_adapter: bool = field(default=False, metadata={
        "help": "With --lora, also write the trained adapter to '<output_dir>/adapter' (PeftModel.from_pretrained)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace output_dir if it holds an earlier pilot-hf result (a folder pilot-hf did not write is "
                "never replaced)."})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "Where Trainer checkpoints go (save_strategy); default: '<output_dir>-checkpoints' beside "
                "output_dir."})


ARGUMENTS = (ModelArguments, DataArguments, EvalArguments, PILoTTrainingArguments, FinetuneArguments)
_LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "save_adapter")
# PILoT settings that a fine-tuning run does not use: in run_config.json, not in the card's table.
_NOT_IN_CARD = {"warm_start", "num_calibration_samples", "alpha_init", "alpha_schedule", "alpha_final", "alpha_min",
                "alpha_max", "delta", "alpha_update_interval", "l1_ratio_threshold", "loss_tolerance",
                "regularization", "mask_learning_rate", "recovery_steps", "gmp_interval", "gmp_start_step",
                "gmp_initial_sparsity", "beta", "init"}
CARD_TITLE_FULL = "Sparse fine-tuning (every zero kept)"
CARD_TITLE_LORA = "Sparse LoRA fine-tuning, merged through the keep-mask (every zero kept)"
DESCRIPTION_FULL = ("Fine-tuned from an already sparse model: every weight of the sparsified layers that was zero "
                    "stayed exactly zero (re-applied after each optimizer step, Adam's state included); nothing "
                    "else was pruned.")
DESCRIPTION_LORA = ("Fine-tuned from an already sparse model with LoRA adapters on its frozen weights, merged through "
                    "the model's keep-mask, W + (B·A·scaling) ⊙ (W ≠ 0) (as in SQFT / PERP): the merged model has "
                    "exactly the zeros of the model it started from.")


def given_keys(argv) -> set[str]:
    """The argument names the user set, on the command line or in the --config YAML file."""
    import yaml

    argv, keys, config = [str(a) for a in argv], set(), None
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            keys.add(key)
            if key == "config":
                config = value or (argv[i + 1] if i + 1 < len(argv) else None)
    if config and Path(config).is_file():
        values = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        keys |= set(values) if isinstance(values, dict) else set()
    return keys


def finetune_training_args(args: PILoTTrainingArguments, ft_args: FinetuneArguments,
                           given: set[str]) -> PILoTTrainingArguments:
    """The arguments of a fine-tuning run: method='finetune', sparsity=0, keep_zeros=True. A user's other
    choice for those is refused (ValueError), never silently replaced."""
    wrong = []
    if "method" in given and args.method != "finetune":
        wrong.append(f"--method {args.method}")
    if "sparsity" in given and args.sparsity != 0:
        wrong.append(f"--sparsity {args.sparsity:g}")
    if "sparsity_pattern" in given and args.sparsity_pattern != "unstructured":
        wrong.append(f"--sparsity_pattern {args.sparsity_pattern}")
    if args.warm_start:
        wrong.append(f"--warm_start {args.warm_start}")
    if args.recovery_steps:
        wrong.append(f"--recovery_steps {args.recovery_steps}")
    if "keep_zeros" in given and not args.keep_zeros:
        wrong.append("--keep_zeros false")
    if wrong:
        raise ValueError(f"pilot-hf finetune keeps the model's own zeros and prunes nothing (method finetune, "
                         f"sparsity 0, keep_zeros), so {', '.join(wrong)} does not apply: drop it. To prune, use "
                         "`pilot-hf oneshot` or `pilot-hf compress` first, then fine-tune the result.")
    if ft_args.lora:
        lora_refused = []
        if args.distills:
            lora_refused.append("distillation (--distill_logit_weight / --distill_feature_weight)")
        if args.weight_learning_rate is not None:
            lora_refused.append("--weight_learning_rate")
        if args.tensorwise_second_moment:
            lora_refused.append("--tensorwise_second_moment")
        if lora_refused:
            raise ValueError(f"--lora does not support {', '.join(lora_refused)} yet (LoRA trains the adapters "
                             "with a plain transformers Trainer). Drop it, or fine-tune in full mode (without "
                             "--lora), which supports it.")
    else:
        set_lora = sorted(k for k in _LORA_ONLY if k in given)
        if set_lora:
            raise ValueError(f"{', '.join('--' + k for k in set_lora)} only apply with --lora; add --lora or drop "
                             "them.")
    if args.distills and not args.teacher_model_name_or_path:
        # The default teacher is the model as given, which here is the sparse model itself: no teacher at all.
        raise ValueError("distillation in pilot-hf finetune needs a dense teacher: the model given is already "
                         "sparse, so a copy of it would teach nothing. Add --teacher_model_name_or_path DENSE_MODEL "
                         "(the model before pruning, same tokenizer), or drop --distill_logit_weight / "
                         "--distill_feature_weight.")
    return args.with_method("finetune", sparsity=0.0, sparsity_pattern="unstructured", keep_zeros=True)


@torch.no_grad()
def model_pattern(model, config) -> str:
    """'2:4' or '4:8' if every target layer satisfies it (in (out, in) layout), else 'unstructured'."""
    layers = find_target_layers(model, config)
    for n, m in ((2, 4), (4, 8)):
        ok = True
        for layer in layers.values():
            w = out_in_layout(layer.weight, layer)
            if w.shape[1] % m or not bool(((w.reshape(w.shape[0], -1, m) == 0).sum(-1) >= m - n).all()):
                ok = False
                break
        if ok:
            return f"{n}:{m}"
    return "unstructured"


def _resume(value, checkpoints: Path, lora: bool, training_args) -> str | None:
    if not lora:
        resume = resolve_resume(value, checkpoints)
        from ..trainer import latest_checkpoint

        latest = latest_checkpoint(checkpoints)
    else:  # plain Trainer checkpoints (no pilot_state.json)
        from transformers.trainer_utils import get_last_checkpoint

        latest = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        resume = None
        if value is not None and str(value).lower() != "false":
            resume = latest if str(value).lower() == "true" else str(value)
            if resume is None or not Path(resume).is_dir():
                raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint found (looked in {checkpoints}). "
                                 "Give a checkpoint-* folder, or start without --resume_from_checkpoint.")
    refuse_stale_checkpoints(resume, training_args, latest, checkpoints)
    return resume


def run(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
        training_args: PILoTTrainingArguments, ft_args: FinetuneArguments, argv: list[str] = ()) -> dict:
    start = time.perf_counter()
    is_main = training_args.process_index == 0
    checkpoints = checkpoint_dir(training_args, ft_args)
    output = OutputFolder(training_args.output_dir, ft_args.overwrite_output_dir, is_main, checkpoints)
    training_args = finetune_training_args(training_args, ft_args, given_keys(argv))
    check_model_source(model_args)
    data_args.check_sources()
    eval_args.check_sources()
    resume = _resume(training_args.resume_from_checkpoint, checkpoints, ft_args.lora, training_args)
    config = training_args.pilot_config()
    with output, removed_if_empty(checkpoints, is_main):
        model, tokenizer = load_model(model_args)
        base_model = base_model_id(model_args, model)
        sparsity_before = check_sparse(model, config)
        zeros_before, _ = count_zeros(model, config)
        pattern = model_pattern(model, config)
        lm_data = prepare_lm_datasets(data_args, tokenizer, model)
        dense = None if eval_args.skip_dense_eval or not is_main else evaluate_model(model, tokenizer, eval_args)
        dense_tasks = None if eval_args.skip_dense_eval or not is_main else \
            evaluate_model_tasks(model, tokenizer, eval_args)
        training_args.output_dir = str(checkpoints)
        data = dict(train_dataset=lm_data["train"], eval_dataset=lm_data.get("validation"), processing_class=tokenizer,
                    data_collator=default_data_collator)
        lora_settings = {"lora": ft_args.lora}
        if ft_args.lora:
            from transformers import Trainer, set_seed

            lora_config = sparse_lora_config(model, ft_args.lora_r, ft_args.lora_alpha, ft_args.lora_dropout,
                                             ft_args.lora_target_modules, config)
            lora_settings.update(lora_r=ft_args.lora_r, lora_alpha=ft_args.lora_alpha,
                                 lora_dropout=ft_args.lora_dropout,
                                 lora_target_modules=ft_args.lora_target_modules or "pilot-hf targets (all-linear)")
            set_seed(training_args.seed)  # the adapters' random init, reproducible like the rest of the run
            peft_model = prepare_sparse_lora(model, lora_config)
            trainer = Trainer(model=peft_model, args=training_args, **data)
            train_output = trainer.train(resume_from_checkpoint=resume)
            peak_memory = peak_memory_bytes(training_args.device)
            if is_main:
                if ft_args.save_adapter:
                    peft_model.save_pretrained(output.staging / "adapter")
                model = merge_sparse_lora(peft_model)
                model.save_pretrained(output.staging)
                tokenizer.save_pretrained(output.staging)
        else:
            from ..trainer import PILoTTrainer

            trainer = PILoTTrainer(model=model, args=training_args, **data)
            train_output = trainer.train(resume_from_checkpoint=resume)
            peak_memory = peak_memory_bytes(training_args.device)
            trainer.save_model(str(output.staging))  # on every process: FSDP gathers the full state dict here
            model = trainer.model
            if is_main:
                (output.staging / "training_args.bin").unlink(missing_ok=True)
        training_args.output_dir = str(output.final)
        if is_main:
            report = sparsity_report(model, config)
            zeros_after = report["total"]["zeros"]
            sparse = evaluate_model(model, tokenizer, eval_args)
            sparse_tasks = evaluate_model_tasks(model, tokenizer, eval_args)
            metrics = {"train": train_output.metrics, "mode": "lora" if ft_args.lora else "full",
                       "sparsity_before": sparsity_before, "sparsity_report_total": report["total"],
                       "zeros_before": zeros_before, "zeros_after": zeros_after, "sparsity_pattern": pattern,
                       "world_size": training_args.world_size,
                       "peak_memory_bytes": peak_memory, "dense": dense, "sparse": sparse,
                       "elapsed_s": time.perf_counter() - start,
                       "note": "'dense' is the model as given (already sparse), before fine-tuning",
                       **({"tasks": {"dense": dense_tasks, "sparse": sparse_tasks}} if eval_args.tasks else {})}
            settings = {**training_args.run_settings(), "max_steps": trainer.state.max_steps,
                        "method": "finetune", "sparsity": sparsity_before, "sparsity_pattern": pattern,
                        **lora_settings}
            record = run_record("finetune", argv, model=asdict(model_args), data=asdict(data_args),
                                eval=asdict(eval_args), finetune=asdict(ft_args), settings=settings)
            write_json(output.staging / "sparsity_report.json", report)
            write_json(output.staging / "metrics.json", metrics)
            write_json(output.staging / "run_config.json", record)
            card_settings = {k: v for k, v in settings.items() if k not in _NOT_IN_CARD}
            info = card_info_for_run(
                card_settings, report, base_model=base_model, results=card_results(dense, sparse),
                command=record["command"], method_description=DESCRIPTION_LORA if ft_args.lora else DESCRIPTION_FULL,
                training_data=f"{data_args.dataset_name or data_args.train_file} (train split)",
                tags=["finetune"] + (["lora"] if ft_args.lora else []),
                task_results=card_task_results(dense_tasks, sparse_tasks))
            info.method = CARD_TITLE_LORA if ft_args.lora else CARD_TITLE_FULL  # DESCRIPTIONS' 'finetune' prunes
            write_model_card(output.staging, info)
        trainer.accelerator.wait_for_everyone()
    if is_main:
        if sparse_tasks:
            print(task_table(dense_tasks, sparse_tasks))
        print(summary_table(dense, sparse, report["total"]["sparsity"], output.final, time.perf_counter() - start,
                            checkpoints if checkpoints.is_dir() else None))
        return metrics
    return {}
