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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import default_data_collator

from .data import DataArguments, calibration_blocks, prepare_lm_datasets
from .evaluation import EvalArguments, evaluate_model, evaluate_model_tasks
from .loading import ModelArguments, load_model
from .methods import ALL_METHODS, DENSE, MethodSpec
from .pruning import SparsityPattern
from .runs import FolderLock, OutputError, write_json
from .training_args import PILoTTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class SweepArguments:
    """The grid. Every trained cell gets the same PILoTTrainingArguments (the training budget); one-shot cells
    and warm starts calibrate on num_calibration_samples blocks of the same training data."""

    methods: list[str] = field(default_factory=lambda: ["dense", "magnitude", "wanda", "sparsegpt"], metadata={
        "help": f"Methods: {', '.join(ALL_METHODS)} ('<trained>+<one-shot>': a trained method with a warm start; "
                "'finetune+<one-shot>+fixed' keeps that start's pattern fixed (keep_zeros); append '+ham' to a trained "
                "method to add HAM's step with the given ham_alpha/ham_beta, and '+kd' to distil from the dense model "
                "with the given distill_* settings, or logit distillation of weight 1 if none are given; in that "
                "order, e.g. finetune+sparsegpt+fixed+ham+kd)."})
    sparsities: list[str] = field(default_factory=lambda: ["0.5", "0.7", "2:4"], metadata={
        "help": "Sparsities (fractions, unstructured per layer) or N:M patterns."})

    def __post_init__(self):
        self.specs = [MethodSpec.parse(m) for m in self.methods]
        for spec in self.sparsities:
            parse_cell_sparsity(spec)


def parse_cell_sparsity(spec: str) -> tuple[float, str]:
    """'0.5' -> (0.5, 'unstructured'); '2:4' -> (0.5, '2:4')."""
    try:
        return SparsityPattern.parse("unstructured").resolve_sparsity(float(spec)), "unstructured"
    except ValueError as err:
        if ":" not in str(spec):
            raise ValueError(f"sparsity {spec!r}: give a fraction like 0.5 or an N:M pattern like 2:4 ({err})") from None
    pattern = SparsityPattern.parse(spec)
    if not pattern.is_nm:
        raise ValueError(f"sparsity {spec!r}: give a fraction like 0.5 or an N:M pattern like 2:4.")
    return pattern.resolve_sparsity(None), str(pattern)


def cell_arguments(training_args: PILoTTrainingArguments, spec: MethodSpec, sparsity_spec: str,
                   output_dir: str) -> PILoTTrainingArguments:
    """The training arguments of one trained cell: the shared budget, this cell's method and target; a fixed
    one-shot pattern, HAM and distillation only in cells named with '+fixed' / '+ham' / '+kd'."""
    sparsity, pattern = parse_cell_sparsity(sparsity_spec)
    distill = {"distill_logit_weight": 0.0, "distill_feature_weight": 0.0, "teacher_model_name_or_path": None,
               "teacher_dtype": None, "lm_loss_weight": 1.0, "teacher_sample_share": 0.0}  # no '+kd': no teacher
    if spec.distill:  # the given distillation recipe, or logit distillation with weight 1 if none was given
        distill = {} if training_args.distills else {"distill_logit_weight": 1.0}
    return training_args.with_method(spec.name, warm_start=spec.warm_start, sparsity=None if ":" in pattern else
                                     sparsity, sparsity_pattern=pattern, output_dir=output_dir, save_strategy="no",
                                     report_to=[], disable_tqdm=True, resume_from_checkpoint=None, ham=spec.ham,
                                     keep_zeros=spec.fixed, **distill)


def cell_settings(spec: MethodSpec, sparsity_spec: str, model_args: ModelArguments, data_args: DataArguments,
                  eval_args: EvalArguments, training_args: PILoTTrainingArguments) -> dict:
    """What a cell's numbers depend on (stored with the cell, compared on resume): the model, the evaluation,
    and for trained cells the run settings record, for calibrated ones the calibration data."""
    settings = {"model": asdict(model_args), "eval": eval_args.settings()}
    if spec.trained or spec.calibrates:
        settings["data"] = {k: v for k, v in asdict(data_args).items() if k not in ("preprocessing_num_workers",
                                                                                     "overwrite_cache")}
    if spec.trained:
        settings["training"] = cell_arguments(training_args, spec, sparsity_spec, "unused").run_settings()
    elif spec.calibrates:
        settings["calibration"] = {"num_calibration_samples": training_args.num_calibration_samples,
                                   "seed": training_args.seed}
    return json.loads(json.dumps(settings))  # as it will read back from results.json


def _check_resumable(results: list[dict], current: dict[tuple[str, str], dict], path: Path) -> None:
    for r in results:
        cell = (r["method"], r["sparsity"])
        if cell not in current:
            continue
        old, new = r.get("settings"), current[cell]
        if old is None:
            logger.warning("sweep: %s at %s in %s has no recorded settings (older sweep); reusing it as is.",
                           *cell, path)
        elif old != new:
            diff = sorted(_differences(old, new))
            raise OutputError(
                f"{path} holds {cell[0]} at {cell[1]} computed with other settings ({', '.join(diff)}). Use another "
                "--output_dir, or remove that cell from results.json to recompute it.")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out


def run_cell(base_model, tokenizer, spec: MethodSpec, sparsity_spec: str, training_args: PILoTTrainingArguments,
             eval_args: EvalArguments, blocks) -> dict:
    from .oneshot import oneshot_prune
    from .trainer import PILoTTrainer
    from .wrapping import sparsity_report

    sparsity, pattern = (0.0, "unstructured") if spec.name == DENSE else parse_cell_sparsity(sparsity_spec)
    model = copy.deepcopy(base_model)
    start = time.perf_counter()
    extra: dict = {}
    if spec.trained:
        with tempfile.TemporaryDirectory(prefix="pilot-sweep-") as tmp:
            args = cell_arguments(training_args, spec, sparsity_spec, tmp)
            trainer = PILoTTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
            trainer.train()
        model = trainer.model
        extra = {"tokens_trained": args.tokens_trained(trainer.state.global_step, len(blocks[0]["input_ids"])),
                 "learning_rate": trainer.args.learning_rate,  # resolved from the weights' scale unless given
                 "train_log": [h for h in trainer.state.log_history if "loss" in h],
                 "alpha_history": trainer.controller.history if trainer.controller else []}
    elif spec.oneshot:
        calibration = None
        if spec.calibrates:
            calibration = calibration_blocks(blocks, training_args.num_calibration_samples, seed=training_args.seed)
        oneshot_prune(model, calibration, method=spec.oneshot, sparsity=None if ":" in pattern else sparsity,
                      pattern=pattern, config=training_args.pilot_config())
    elapsed = time.perf_counter() - start
    ppl = evaluate_model(model, tokenizer, eval_args)
    tasks = evaluate_model_tasks(model, tokenizer, eval_args)
    if tasks is not None:  # accuracies in the table; the harness's full entries (stderr, samples) beside them
        extra.update(tasks={name: {k: v for k, v in r.items() if k in ("acc", "acc_norm")}
                            for name, r in tasks["tasks"].items()},
                     task_results=tasks, task_eval_s=tasks["elapsed_s"])
    actual = sparsity_report(model, training_args.pilot_config())["total"]["sparsity"] if spec.name != DENSE else 0.0
    return {"method": str(spec), "sparsity": sparsity_spec, "pattern": pattern, "actual_sparsity": actual,
            "time_s": elapsed, "perplexity": {k: v["perplexity"] for k, v in ppl.items()}, **extra}


def sweep(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
          training_args: PILoTTrainingArguments, grid: SweepArguments) -> list[dict]:
    """Run every (method, sparsity) cell not already in `output_dir/results.json`; write the tables and plot.

    `training_args.output_dir` is the sweep's folder; every trained cell trains with `training_args`
    (its method, warm start and target replaced by the cell's) in a temporary folder."""
    if training_args.keep_zeros:  # before the folder is made
        raise ValueError("keep_zeros is chosen per cell in a sweep: name the cells that keep a one-shot start's "
                         "pattern 'finetune+<one-shot>+fixed' (e.g. finetune+sparsegpt+fixed) and leave keep_zeros off.")
    out = Path(training_args.output_dir).expanduser()
    with FolderLock(out.resolve()):
        out.mkdir(parents=True, exist_ok=True)
        results_path = out / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else []
        done = {(r["method"], r["sparsity"]) for r in results}
        cells = [(spec, "0") if spec.name == DENSE else (spec, s) for spec in grid.specs
                 for s in (["0"] if spec.name == DENSE else grid.sparsities)]
        settings = {(str(spec), s): cell_settings(spec, s, model_args, data_args, eval_args, training_args)
                    for spec, s in cells}
        _check_resumable(results, settings, results_path)  # before anything is computed
        todo = [(spec, s) for spec, s in cells if (str(spec), s) not in done]
        if any(spec.trained for spec, _ in todo) and training_args.max_steps < 1:
            raise ValueError("the sweep's trained methods need a fixed budget: give max_steps ≥ 1.")
        logger.info("sweep: %d cells, %d already done", len(cells), len(cells) - len(todo))
        if todo:
            base, tokenizer = load_model(model_args)
            blocks = None
            if any(spec.trained or spec.calibrates for spec, _ in todo):
                blocks = prepare_lm_datasets(data_args, tokenizer, base)["train"]
            for spec, s in todo:
                logger.info("sweep: %s at %s", spec, s)
                cell = run_cell(base, tokenizer, spec, s, training_args, eval_args, blocks)
                results.append({**cell, "settings": settings[(str(spec), s)]})
                write_json(results_path, results)  # a finished cell is never lost, never recomputed
        write_tables(results, out, {"model": asdict(model_args), "data": asdict(data_args),
                                    "eval": asdict(eval_args), "grid": {"methods": grid.methods,
                                                                         "sparsities": grid.sparsities},
                                    "training": training_args.run_settings()})
    return results


def _task_cells(r: dict, tasks: list[str]) -> list[str]:
    """acc per task (in %), their mean when there are several, and the task evaluation's wall time."""
    accs = [r.get("tasks", {}).get(t, {}).get("acc") for t in tasks]
    cells = ["" if a is None else f"{100 * a:.2f}" for a in accs]
    if len(tasks) > 1:
        cells.append(f"{100 * sum(accs) / len(accs):.2f}" if all(a is not None for a in accs) else "")
    return cells + [f"{r['task_eval_s']:.1f}" if "task_eval_s" in r else ""]


def write_tables(results: list[dict], out: Path, config: dict | None = None) -> None:
    texts = sorted({t for r in results for t in r["perplexity"]})
    tasks = list(dict.fromkeys(t for r in results for t in r.get("tasks", {})))
    task_header = [*[f"acc_{t}" for t in tasks], *(["acc_mean"] if len(tasks) > 1 else []), "task_eval_s"] \
        if tasks else []
    header = ["method", "sparsity", "actual_sparsity", *[f"ppl_{t}" for t in texts], *task_header, "time_s",
              "tokens_trained"]
    rows = [[r["method"], r["sparsity"], f"{r['actual_sparsity']:.4f}",
             *[f"{r['perplexity'].get(t, float('nan')):.3f}" for t in texts],
             *(_task_cells(r, tasks) if tasks else []), f"{r['time_s']:.1f}",
             r.get("tokens_trained", 0)] for r in results]
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                          for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    if config is not None:
        write_json(out / "sweep_config.json", config)
    if texts:  # a sweep of tasks alone has no perplexity to draw
        plot(results, texts, out / "perplexity_vs_sparsity.png")


def plot(results: list[dict], texts: list[str], path: Path) -> None:
    """The perplexity-vs-sparsity figure; needs the `plot` extra (matplotlib), skipped with a note without it."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("sweep: matplotlib is not installed, so %s was not drawn (pip install 'pilot-hf[plot]'); "
                       "the tables are written.", path.name)
        return

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
