"""End-to-end runs: load -> (warm start) -> compress or prune -> evaluate -> save. The CLI calls these.

Every run writes into a hidden sibling folder `.<name>.partial` and renames it to `output_dir` only when
everything is written, so `output_dir` is never half-written; a failed run leaves its checkpoints in
the partial folder to resume from, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import default_data_collator

from .assets import DEMO_MODEL, is_offline, load_demo_model
from .data import EVALUATION_TEXTS, DataArguments, calibration_samples, prepare_lm_datasets
from .evaluation import heldout_perplexity

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UserError(Exception):
    """Bad input or environment: the message says what was wrong and how to fix it (CLI: no traceback)."""


@dataclass
class ModelArguments:
    """Which model to compress."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": f"A local model folder, a Hub id, or '{DEMO_MODEL}' (the offline SmolLM2-135M-Instruct, the "
                "default)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    dtype: str = field(default="float32", metadata={
        "help": "Weights dtype to load: float32 (default; use --bf16 for mixed-precision training), bfloat16 or "
                "float16."})
    revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {sorted(DTYPES)}.")


@dataclass
class EvalArguments:
    """Held-out perplexity, before and after compression."""

    eval_texts: list[str] = field(default_factory=lambda: ["kjv", "pydoc"], metadata={
        "help": f"Built-in held-out texts to evaluate on ({', '.join(EVALUATION_TEXTS)}); never trained on."})
    eval_max_tokens: int | None = field(default=8192, metadata={
        "help": "Evaluate on the first N tokens of each text (None: all of it)."})
    eval_max_length: int = field(default=512, metadata={"help": "Sliding-window length (tokens)."})
    eval_stride: int | None = field(default=None, metadata={
        "help": "Tokens between window starts; default eval_max_length (no overlap)."})
    eval_batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    skip_dense_eval: bool = field(default=False, metadata={"help": "Do not evaluate the model before compression."})


@dataclass
class RunArguments:
    """How this run starts and where its result goes."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace output_dir if it exists (otherwise an existing output_dir is refused)."})
    warm_start: str | None = field(default=None, metadata={
        "help": "Start PILoT from a one-shot pruned model (x_init, METHOD.md section 2): 'wanda', 'sparsegpt' or "
                "'magnitude'. Pruned weights start at 0 and may regrow."})
    num_calibration_samples: int = field(default=32, metadata={
        "help": "Calibration blocks for one-shot methods and warm starts."})
    calibration_seqlen: int = field(default=256, metadata={"help": "Tokens per calibration block."})
    calibration_dataset: str | None = field(default=None, metadata={
        "help": "Calibration text (a dataset_name such as 'builtin:kjv'); default: the training data."})


# ----- model loading -------------------------------------------------------------------------------

def load_model(args: ModelArguments):
    """(model, tokenizer) from a local folder, a compressed pilot-hf folder, the Hub, or the demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = args.model_name_or_path or DEMO_MODEL
    dtype = DTYPES[args.dtype]
    if name == DEMO_MODEL:
        try:
            return load_demo_model(dtype)
        except FileNotFoundError as err:
            raise UserError(str(err)) from err
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json). Give a folder written by "
                            "save_pretrained, a Hub id, or '{DEMO_MODEL}'.")
        from .serialization import is_compressed, load_compressed

        model = load_compressed(path, dtype=dtype) if is_compressed(path) else \
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or path)
        return model, tokenizer
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or not _HUB_ID.match(name):
        raise UserError(f"model path {name!r} does not exist. Give an existing model folder, a Hub id "
                        f"(namespace/name), or '{DEMO_MODEL}'.")
    if is_offline():
        raise UserError(f"{name!r} is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1). "
                        f"Download it elsewhere and pass its local folder, or use '{DEMO_MODEL}'.")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, revision=args.revision)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or name, revision=args.revision)
    except OSError as err:
        raise UserError(f"could not load {name!r} from the Hugging Face Hub ({err}). Check the id and your "
                        f"network; offline, pass a local folder or '{DEMO_MODEL}'.") from err
    return model, tokenizer


# ----- output folder -------------------------------------------------------------------------------

def check_output_dir(output_dir: str, overwrite: bool) -> tuple[Path, Path]:
    """(final, partial) folders; refuses an existing output_dir, an unwritable parent, a stale partial run."""
    final = Path(output_dir).expanduser().resolve()
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise UserError(f"output_dir {final} already exists and is not empty. Choose another --output_dir, or pass "
                        "--overwrite_output_dir to replace it.")
    parent = final.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write under {existing} (no write permission), so output_dir {final} cannot be "
                        "created. Choose an --output_dir in a folder you can write to.")
    return final, parent / f".{final.name}.partial"


@contextmanager
def staged_output(output_dir: str, overwrite: bool, resume: bool, is_main: bool = True):
    """Yield the partial folder to write into; on success move it to output_dir atomically."""
    final, partial = check_output_dir(output_dir, overwrite)
    if partial.exists() and not resume and is_main:
        checkpoints = sorted(p.name for p in partial.glob("checkpoint-*"))
        if checkpoints:
            raise UserError(f"an unfinished run to {final} left {partial} with {checkpoints}. Resume it with "
                            f"--resume_from_checkpoint {partial / checkpoints[-1]}, or delete that folder.")
        shutil.rmtree(partial)
    if is_main:
        try:
            partial.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {partial.parent} for output_dir {final} ({err.strerror}). Choose an "
                            "--output_dir in a folder you can write to.") from err
    try:
        yield partial
    except BaseException:
        if is_main and partial.exists() and not any(partial.glob("checkpoint-*")):
            shutil.rmtree(partial, ignore_errors=True)
        elif is_main and partial.exists():
            print(f"the run failed; its checkpoints are kept in {partial} (resume with --resume_from_checkpoint)",
                  file=sys.stderr)
        raise
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


# ----- evaluation ----------------------------------------------------------------------------------

def evaluate_model(model, tokenizer, args: EvalArguments) -> dict[str, dict]:
    results = heldout_perplexity(model, tokenizer, args.eval_texts, max_tokens=args.eval_max_tokens,
                                 max_length=args.eval_max_length, stride=args.eval_stride,
                                 batch_size=args.eval_batch_size)
    return {name: r.to_dict() for name, r in results.items()}


def card_results(dense: dict | None, sparse: dict) -> list[dict]:
    """Held-out perplexities in the model card's form (built-in texts are named, not Hub datasets)."""
    return [{"dataset": f"pilot-hf/builtin-{name}", "dataset_name": f"{name} (held-out part, built-in text)",
             "split": "test", "sparse_perplexity": r["perplexity"],
             **({"dense_perplexity": dense[name]["perplexity"]} if dense else {})} for name, r in sparse.items()]


def base_model_id(model_args: ModelArguments, model) -> str:
    return getattr(model.config, "name_or_path", None) or model_args.model_name_or_path or DEMO_MODEL


def summary_table(dense: dict | None, sparse: dict, sparsity: float, output_dir: Path, elapsed_s: float) -> str:
    lines = ["| text | dense ppl | sparse ppl |", "|---|---|---|"]
    for name, r in sparse.items():
        d = f"{dense[name]['perplexity']:.2f}" if dense else "-"
        lines.append(f"| {name} | {d} | {r['perplexity']:.2f} |")
    lines.append(f"\nsparsity of the target layers: {sparsity:.4f}   time: {elapsed_s:.0f} s")
    lines.append(f"saved to: {output_dir}")
    return "\n".join(lines)


# ----- compress ------------------------------------------------------------------------------------

def compress(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments, training_args,
             run_args: RunArguments) -> dict:
    """PILoT compression of a causal LM: train masks, prune, merge, evaluate, save. Returns the metrics."""
    from .oneshot import oneshot_prune
    from .trainer import PILoTTrainer

    start = time.perf_counter()
    is_main = training_args.process_index == 0
    resume = training_args.resume_from_checkpoint
    with staged_output(training_args.output_dir, run_args.overwrite_output_dir, bool(resume), is_main) as partial:
        final_dir = Path(training_args.output_dir).expanduser().resolve()
        model, tokenizer = load_model(model_args)
        PILoTTrainer.check_pattern(model, training_args)  # fail before any slow step
        lm_data = prepare_lm_datasets(data_args, tokenizer, model)
        dense = None if eval_args.skip_dense_eval or not is_main else evaluate_model(model, tokenizer, eval_args)
        if run_args.warm_start and not resume:
            calib = calibration_samples(tokenizer, run_args.calibration_dataset or data_args,
                                        run_args.num_calibration_samples, run_args.calibration_seqlen,
                                        seed=training_args.seed)
            oneshot_prune(model, calib, method=run_args.warm_start, sparsity=training_args.sparsity,
                          pattern=training_args.sparsity_pattern, config=training_args.pilot_config())
        training_args.output_dir = str(partial)
        # Packed blocks all have block_size tokens: stack them, no padding (tokenizers may have no pad token).
        trainer = PILoTTrainer(model=model, args=training_args, train_dataset=lm_data["train"],
                               eval_dataset=lm_data.get("validation"), processing_class=tokenizer,
                               data_collator=default_data_collator)
        train_output = trainer.train(resume_from_checkpoint=resume)
        training_args.output_dir = str(final_dir)
        metrics = {"train": train_output.metrics, "sparsity_report_total": trainer.sparsity_report["total"],
                   "alpha_history": trainer.controller.history, "world_size": training_args.world_size}
        trainer.save_model(str(partial))  # on every process: FSDP gathers the full state dict here
        if is_main:
            # Trainer also pickles its arguments; the output folder holds safetensors and JSON only.
            (partial / "training_args.bin").unlink(missing_ok=True)
            sparse = evaluate_model(trainer.model, tokenizer, eval_args)
            metrics.update(dense=dense, sparse=sparse, elapsed_s=time.perf_counter() - start,
                           tokens_trained=trainer.state.global_step * training_args.train_batch_size * training_args.world_size
                           * training_args.gradient_accumulation_steps
                           * len(lm_data["train"][0]["input_ids"]))
            write_json(partial / "sparsity_report.json", trainer.sparsity_report)
            write_json(partial / "metrics.json", metrics)
            from .hub import write_model_card

            write_model_card(partial, trainer.card_info(
                results=card_results(dense, sparse), base_model=base_model_id(model_args, model),
                command=" ".join(["pilot-hf", *sys.argv[1:]]),
                training_data=f"{data_args.dataset_name or data_args.train_file} (train split)"))
            write_json(partial / "run_config.json", {
                "model": asdict(model_args), "data": asdict(data_args), "eval": asdict(eval_args),
                "run": asdict(run_args), "training": json.loads(training_args.to_json_string()),
                "command": " ".join(sys.argv)})
        trainer.accelerator.wait_for_everyone()
    if is_main:
        print(summary_table(dense, metrics["sparse"], trainer.sparsity_report["total"]["sparsity"], final_dir,
                            time.perf_counter() - start))
    return metrics


# ----- one-shot and evaluate -----------------------------------------------------------------------

@dataclass
class OneShotArguments:
    """One-shot pruning (no training)."""

    method: str = field(default="sparsegpt", metadata={"help": "magnitude, wanda or sparsegpt."})
    sparsity: float | None = field(default=None, metadata={
        "help": "Fraction of target weights removed; default 0.5, and N:M patterns imply (M-N)/M."})
    sparsity_pattern: str = field(default="unstructured", metadata={"help": "unstructured, row or N:M (e.g. 2:4)."})
    output_dir: str = field(default="outputs/oneshot", metadata={"help": "Where the pruned model is saved."})
    seed: int = field(default=0, metadata={"help": "Seed for choosing calibration blocks."})

    def __post_init__(self):
        from .oneshot.prune import resolve_method
        from .pruning import SparsityPattern

        resolve_method(self.method)
        pattern = SparsityPattern.parse(self.sparsity_pattern)
        if self.sparsity is None and not pattern.is_nm:
            self.sparsity = 0.5
        self.sparsity = pattern.resolve_sparsity(self.sparsity)


@dataclass
class EvaluateArguments:
    """Where to write the evaluation results (optional)."""

    output_file: str | None = field(default=None, metadata={"help": "Write the perplexities as JSON here."})


def oneshot(model_args: ModelArguments, os_args: OneShotArguments, eval_args: EvalArguments,
            run_args: RunArguments) -> dict:
    """Prune with magnitude / Wanda / SparseGPT, evaluate, and save a plain sparse model."""
    from .oneshot import oneshot_prune

    start = time.perf_counter()
    with staged_output(os_args.output_dir, run_args.overwrite_output_dir, resume=False) as partial:
        final_dir = Path(os_args.output_dir).expanduser().resolve()
        model, tokenizer = load_model(model_args)
        dense = None if eval_args.skip_dense_eval else evaluate_model(model, tokenizer, eval_args)
        calib = None
        if os_args.method != "magnitude":
            calib = calibration_samples(tokenizer, run_args.calibration_dataset or "builtin:kjv",
                                        run_args.num_calibration_samples, run_args.calibration_seqlen,
                                        seed=os_args.seed)
        report = oneshot_prune(model, calib, method=os_args.method, sparsity=os_args.sparsity,
                               pattern=os_args.sparsity_pattern)
        sparse = evaluate_model(model, tokenizer, eval_args)
        metrics = {"dense": dense, "sparse": sparse, "prune_time_s": report.prune_time_s,
                   "elapsed_s": time.perf_counter() - start}
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        write_json(partial / "sparsity_report.json", {"layers": report.layers, "total": report.total})
        write_json(partial / "metrics.json", metrics)
        from .hub import write_model_card

        write_model_card(partial, {
            "base_model": base_model_id(model_args, model), "method": os_args.method,
            "sparsity_report": {"layers": report.layers, "total": report.total},
            "hyperparameters": {**report.method_config, "sparsity": os_args.sparsity,
                                "num_calibration_samples": run_args.num_calibration_samples,
                                "calibration_seqlen": run_args.calibration_seqlen},
            "pattern": os_args.sparsity_pattern, "results": card_results(dense, sparse),
            "command": " ".join(["pilot-hf", *sys.argv[1:]])})
        write_json(partial / "run_config.json", {"model": asdict(model_args), "oneshot": asdict(os_args),
                                                 "eval": asdict(eval_args), "run": asdict(run_args),
                                                 "method_config": report.method_config,
                                                 "command": " ".join(sys.argv)})
    print(summary_table(dense, sparse, report.total["sparsity"], final_dir, time.perf_counter() - start))
    return metrics


def evaluate(model_args: ModelArguments, eval_args: EvalArguments, args: EvaluateArguments) -> dict:
    """Held-out perplexity of a model; prints a table, optionally writes JSON."""
    model, tokenizer = load_model(model_args)
    results = evaluate_model(model, tokenizer, eval_args)
    print("| text | perplexity | tokens | tokens/s |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['perplexity']:.3f} | {r['tokens_scored']} | {r['tokens_per_s']:.0f} |")
    if args.output_file:
        out = Path(args.output_file)
        tmp = out.with_name(out.name + ".tmp")
        write_json(tmp, results)
        os.replace(tmp, out)
    return results
