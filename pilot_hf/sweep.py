"""`sweep`: methods x sparsities -> one table (JSON, CSV, Markdown) and a perplexity-vs-sparsity plot.

Every cell starts from the same pristine model (a deep copy), is pruned (one-shot) or trained (PILoT and its
ablations, same token budget for all), then evaluated on the same held-out texts. Cells are written to
`results.json` as they finish; rerunning the same sweep skips finished cells (resumable).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .pipeline import EvalArguments, ModelArguments, UserError, evaluate_model, load_model
from .pruning import SparsityPattern

logger = logging.getLogger(__name__)
ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")
TRAINED_METHODS = ("pilot", "spred", "l1", "dense-ft")  # dense-ft: the trainer's method='dense'
# A trained method from a one-shot x_init (pruned weights start at 0 and may regrow): 'pilot+wanda', ...;
# 'dense-ft+wanda' is the control: plain fine-tuning of the one-shot model, then magnitude pruning.
WARM_STARTS = tuple(f"{t}+{o}" for t in TRAINED_METHODS for o in ONESHOT_METHODS)
METHODS = ("dense",) + ONESHOT_METHODS + TRAINED_METHODS + WARM_STARTS


@dataclass
class SweepArguments:
    """The grid, and the training budget shared by every trained method."""

    methods: list[str] = field(default_factory=lambda: ["dense", "magnitude", "wanda", "sparsegpt"], metadata={
        "help": f"Methods: {', '.join(METHODS)}."})
    sparsities: list[str] = field(default_factory=lambda: ["0.5", "0.7", "2:4"], metadata={
        "help": "Sparsities (fractions, unstructured per layer) or N:M patterns."})
    output_dir: str = field(default="outputs/sweep", metadata={"help": "Where the table and plot go."})
    train_dataset: str = field(default="builtin:kjv", metadata={
        "help": "Training and calibration text (a dataset_name); never one of the evaluation texts' held-out parts."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training / calibration block."})
    num_calibration_samples: int = field(default=32, metadata={"help": "Calibration blocks for one-shot methods."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps of every trained method."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Blocks per step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of weights."})
    mask_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of masks."})
    weight_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the target layers' weights (default: learning_rate)."})
    alpha_init: float = field(default=1e-4, metadata={"help": "Initial α of the regularized methods."})
    alpha_update_interval: int = field(default=4, metadata={"help": "Steps per controller decision."})
    recovery_steps: int = field(default=10, metadata={"help": "Final steps with the pruning pattern frozen."})
    beta: float = field(default=1.0, metadata={"help": "PILoT init scale β."})
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling and training."})
    extra_training_args: str | None = field(default=None, metadata={
        "help": "A YAML file of further PILoTTrainingArguments for the trained methods."})

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose among {list(METHODS)}.")
        for spec in self.sparsities:
            parse_cell_sparsity(spec)


# What a cell's numbers depend on besides its method and sparsity; a resumed sweep must not mix settings.
_CALIBRATION_FIELDS = ("train_dataset", "block_size", "num_calibration_samples", "seed")
_TRAINING_FIELDS = _CALIBRATION_FIELDS + ("max_steps", "per_device_train_batch_size", "learning_rate",
                                          "mask_learning_rate", "weight_learning_rate", "alpha_init",
                                          "alpha_update_interval", "recovery_steps", "beta")


def _is_trained(method: str) -> bool:
    return method in TRAINED_METHODS or method in WARM_STARTS


def _calibrates(method: str) -> bool:
    return method.split("+")[-1] in ("wanda", "sparsegpt")


def cell_settings(method: str, model_args: ModelArguments, eval_args: EvalArguments, args: SweepArguments) -> dict:
    """The settings a cell of `method` was computed with (stored with the cell, compared on resume)."""
    import yaml

    trained = _is_trained(method)
    fields = _TRAINING_FIELDS if trained else _CALIBRATION_FIELDS if _calibrates(method) else ()
    settings = {"model": asdict(model_args), "eval": {k: v for k, v in asdict(eval_args).items()
                                                      if k not in ("eval_batch_size", "skip_dense_eval")}}
    settings.update({f: getattr(args, f) for f in fields})
    if trained and args.extra_training_args:  # the file's content, not its path
        settings["extra_training_args"] = yaml.safe_load(Path(args.extra_training_args).read_text())
    return json.loads(json.dumps(settings))  # as it will read back from results.json


def _check_resumable(results: list[dict], cells: list[tuple[str, str]], current: dict[str, dict], path: Path) -> None:
    for r in results:
        if (r["method"], r["sparsity"]) not in cells:
            continue
        if "settings" not in r:
            logger.warning("sweep: %s at %s in %s has no recorded settings (older sweep); reusing it as is.",
                           r["method"], r["sparsity"], path)
            continue
        old, new = r["settings"], current[r["method"]]
        if old != new:
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise UserError(
                f"{path} holds {r['method']} at {r['sparsity']} computed with other settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} then, {[new.get(k) for k in diff]} now). Use another --output_dir, "
                "or remove that cell from results.json to recompute it.")


def parse_cell_sparsity(spec: str) -> tuple[float, str]:
    """'0.5' -> (0.5, 'unstructured'); '2:4' -> (0.5, '2:4')."""
    try:
        return float(spec), "unstructured"
    except ValueError:
        pattern = SparsityPattern.parse(spec)
        if not pattern.is_nm:
            raise ValueError(f"sparsity {spec!r}: give a fraction like 0.5 or an N:M pattern like 2:4.") from None
        return pattern.resolve_sparsity(None), str(pattern)


def _train(model, tokenizer, method: str, sparsity: float, pattern: str, args: SweepArguments, blocks) -> dict:
    import yaml

    from .trainer import PILoTTrainer
    from .training_args import PILoTTrainingArguments

    extra = yaml.safe_load(Path(args.extra_training_args).read_text()) if args.extra_training_args else {}
    trainer_method = method.split("+")[0].replace("dense-ft", "dense")
    with tempfile.TemporaryDirectory(prefix="pilot-sweep-") as tmp:
        targs = PILoTTrainingArguments(
            output_dir=tmp, method=trainer_method, sparsity=None if ":" in pattern else sparsity,
            sparsity_pattern=pattern, max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate,
            mask_learning_rate=args.mask_learning_rate, weight_learning_rate=args.weight_learning_rate,
            alpha_init=args.alpha_init,
            alpha_update_interval=args.alpha_update_interval, recovery_steps=args.recovery_steps, beta=args.beta,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(args.max_steps // 10, 1),
            save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True, dataloader_pin_memory=False,
            **extra)
        from transformers import default_data_collator

        trainer = PILoTTrainer(model=model, args=targs, train_dataset=blocks, data_collator=default_data_collator)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"tokens_trained": args.max_steps * args.per_device_train_batch_size * args.block_size,
            "train_log": logs, "alpha_history": trainer.controller.history if trainer.controller else []}


def run_cell(base_model, tokenizer, method: str, spec: str, args: SweepArguments, eval_args: EvalArguments,
             calibration, blocks) -> dict:
    from .oneshot import oneshot_prune
    from .wrapping import sparsity_report

    sparsity, pattern = parse_cell_sparsity(spec)
    model = copy.deepcopy(base_model)
    start = time.perf_counter()
    extra: dict = {}
    if method in ONESHOT_METHODS or method in WARM_STARTS:
        oneshot = method.split("+")[-1]
        oneshot_prune(model, calibration if oneshot != "magnitude" else None, method=oneshot,
                      sparsity=None if ":" in pattern else sparsity, pattern=pattern)
    if _is_trained(method):
        extra = _train(model, tokenizer, method, sparsity, pattern, args, blocks)
    elapsed = time.perf_counter() - start
    ppl = evaluate_model(model, tokenizer, eval_args)
    actual = sparsity_report(model)["total"]["sparsity"] if method != "dense" else 0.0
    return {"method": method, "sparsity": spec, "pattern": pattern, "actual_sparsity": actual, "time_s": elapsed,
            "perplexity": {k: v["perplexity"] for k, v in ppl.items()}, **extra}


def sweep(model_args: ModelArguments, eval_args: EvalArguments, args: SweepArguments) -> list[dict]:
    """Run every (method, sparsity) cell not already in `output_dir/results.json`; write the tables and plot."""
    from .data import DataArguments, calibration_samples, prepare_lm_datasets

    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out} ({err.strerror}); choose another --output_dir.") from err
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["method"], r["sparsity"]) for r in results}
    cells = [("dense", "0")] if "dense" in args.methods else []
    cells += [(m, s) for m in args.methods if m != "dense" for s in args.sparsities]
    settings = {m: cell_settings(m, model_args, eval_args, args) for m in args.methods}
    _check_resumable(results, cells, settings, results_path)
    todo = [c for c in cells if c not in done]
    logger.info("sweep: %d cells, %d already done", len(cells), len(cells) - len(todo))
    if todo:
        base, tokenizer = load_model(model_args)
        calibration = blocks = None
        if any(_calibrates(m) for m, _ in todo):
            calibration = calibration_samples(tokenizer, args.train_dataset, args.num_calibration_samples,
                                              args.block_size, seed=args.seed)
        if any(_is_trained(m) for m, _ in todo):
            blocks = prepare_lm_datasets(DataArguments(dataset_name=args.train_dataset, block_size=args.block_size,
                                                       validation_split_percentage=0), tokenizer, base)["train"]
        for method, spec in todo:
            logger.info("sweep: %s at %s", method, spec)
            cell = run_cell(base, tokenizer, method, spec, args, eval_args, calibration, blocks)
            results.append({**cell, "settings": settings[method]})
            tmp = results_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, results_path)  # a finished cell is never lost, never recomputed
    write_tables(results, out, model_args, eval_args, args)
    return results


def write_tables(results: list[dict], out: Path, model_args=None, eval_args=None, args=None) -> None:
    texts = sorted({t for r in results for t in r["perplexity"]})
    header = ["method", "sparsity", "actual_sparsity", *[f"ppl_{t}" for t in texts], "time_s", "tokens_trained"]
    rows = [[r["method"], r["sparsity"], f"{r['actual_sparsity']:.4f}",
             *[f"{r['perplexity'].get(t, float('nan')):.3f}" for t in texts], f"{r['time_s']:.1f}",
             r.get("tokens_trained", 0)] for r in results]
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                          for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    if args is not None:
        (out / "sweep_config.json").write_text(json.dumps(
            {"model": asdict(model_args), "eval": asdict(eval_args), "sweep": asdict(args)}, indent=1))
    plot(results, texts, out / "perplexity_vs_sparsity.png")


def plot(results: list[dict], texts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results))
    for ax, text in zip(axes[0], texts):
        for i, method in enumerate(methods):
            cells = [r for r in results if r["method"] == method]
            line = sorted((float(r["actual_sparsity"]), r["perplexity"][text]) for r in cells
                          if r["pattern"] == "unstructured")
            color, marker = plt.cm.tab20(i % 20), "o^vDPX"[i // 20 % 6]  # distinct up to 120 methods
            if line:
                ax.plot(*zip(*line), marker=marker, color=color, label=method)
            for r in cells:
                if r["pattern"] not in ("unstructured",):
                    ax.scatter([r["actual_sparsity"]], [r["perplexity"][text]], marker="s", color=color,
                               label=f"{method} {r['pattern']}")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the target layers")
        ax.set_ylabel(f"perplexity ({text}, held out)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
