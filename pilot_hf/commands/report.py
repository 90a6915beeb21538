"""What the commands write and print about a run: the one finish of compress, oneshot and finetune (scores
before and after, the three JSON files, the card, the two printed tables), and its parts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..evaluation import EvalArguments, evaluate_model, evaluate_model_tasks
from ..naming import redact_argv
from ..runs import write_json
from .parser import CommandLine


@dataclass
class Scores:
    """One model's held-out perplexities (`texts`) and harness task results (`tasks`, None without tasks)."""

    texts: dict
    tasks: dict | None = None

    @classmethod
    def of(cls, model, tokenizer, eval_args: EvalArguments, tasks: bool = True) -> Scores:
        return cls(evaluate_model(model, tokenizer, eval_args),
                   evaluate_model_tasks(model, tokenizer, eval_args) if tasks else None)


def scores_before(model, tokenizer, eval_args: EvalArguments, is_main: bool = True, tasks: bool = True):
    """Scores of a model before the run changes it (main process only; none with --skip_dense_eval)."""
    return None if eval_args.skip_dense_eval or not is_main else Scores.of(model, tokenizer, eval_args, tasks)


@dataclass
class Results:
    """What a finished run measured, for the two printed tables."""

    before: Scores | None
    after: Scores
    sparsity: float
    started_at: float
    metrics: dict
    start: tuple[str, Scores] | None = None  # (warm start method, scores of the one-shot start)

    def tables(self, output_dir: Path, checkpoint_dir: Path | None = None) -> str:
        tasks = task_table(self.before and self.before.tasks, self.after.tasks)
        summary = summary_table(self.before and self.before.texts, self.after.texts, self.sparsity, output_dir,
                                time.perf_counter() - self.started_at, checkpoint_dir, self.start)
        return f"{tasks}\n{summary}" if tasks else summary


def finish(staging: Path, command: str, command_line: CommandLine, model, tokenizer, eval_args: EvalArguments, *,
           started_at: float, before: Scores | None, sparsity_report: dict, settings: dict, metrics: dict,
           inputs: dict, card: dict, card_settings: dict | None = None, card_title: str | None = None,
           start: tuple[str, Scores] | None = None) -> Results:
    """Score the result, write sparsity_report.json, metrics.json, run_config.json and the card into `staging`.
    `inputs`: the argument groups the record names (model, data, eval, ...); `card`: the card's own fields."""
    from ..card import card_info_for_run, write_model_card

    after = Scores.of(model, tokenizer, eval_args)
    dense = before.texts if before else None
    metrics = {**metrics, "dense": dense, "sparse": after.texts, **({"start": start[1].texts} if start else {}),
               "elapsed_s": time.perf_counter() - started_at,
               **({"tasks": {"dense": before and before.tasks, "sparse": after.tasks}} if eval_args.tasks else {})}
    record = run_record(command, command_line, **inputs, settings=settings)
    write_json(staging / "sparsity_report.json", sparsity_report)
    write_json(staging / "metrics.json", metrics)
    write_json(staging / "run_config.json", record)
    info = card_info_for_run(card_settings or settings, sparsity_report, results=card_results(dense, after.texts),
                             command=record["command"],
                             task_results=card_task_results(before and before.tasks, after.tasks), **card)
    if card_title:
        info.method = card_title
    write_model_card(staging, info)
    return Results(before, after, sparsity_report["total"]["sparsity"], started_at, metrics, start)


def run_record(command: str, command_line: CommandLine, **parts) -> dict:
    """run_config.json: the run settings record (`settings`) with the inputs that produced it, and the
    command line with every token redacted."""
    from ..version import __version__

    return {"pilot_hf_version": __version__,
            "command": " ".join(redact_argv(["pilot-hf", command, *command_line.argv])), **parts}


def card_results(dense: dict | None, sparse: dict) -> list[dict]:
    """Perplexities in the model card's form: built-in texts are named as such, an evaluation dataset by its
    Hub id, config and split, a local file by its name."""
    out = []
    for name, r in sparse.items():
        source = r.get("source")
        if source is None:
            where = {"dataset": f"pilot-hf/builtin-{name}", "dataset_name": f"{name} (held-out part, built-in text)",
                     "split": "test"}
        elif source["file"]:
            where = {"dataset": Path(source["dataset"]).name, "dataset_name": f"{name} (local file)", "split": "test"}
        else:
            where = {"dataset": source["dataset"], "dataset_name": source["dataset"],
                     "dataset_config": source["config"], "split": source["split"]}
        out.append({**where, "sparse_perplexity": r["perplexity"],
                    **({"dense_perplexity": dense[name]["perplexity"]} if dense else {})})
    return out


def card_task_results(dense: dict | None, sparse: dict | None) -> list[dict]:
    """Harness task accuracies (TaskResults dicts) in the model card's form: acc and, where the task reports
    it, acc_norm."""
    if not sparse:
        return []
    out = []
    for task, r in sparse["tasks"].items():
        for metric in ("acc", "acc_norm"):
            if metric not in r:
                continue
            before = (dense or {}).get("tasks", {}).get(task, {}).get(metric)
            out.append({"task": task, "metric": metric, "sparse_value": r[metric],
                        "stderr": r.get(f"{metric}_stderr"), "dataset": r.get("dataset"),
                        "dataset_config": r.get("dataset_config"), "split": r.get("split"),
                        "num_fewshot": r.get("num_fewshot"), "harness_version": sparse["harness_version"],
                        **({"dense_value": before} if before is not None else {})})
    return out


def task_table(dense: dict | None, sparse: dict | None) -> str:
    """The printed table of task accuracies (empty when no tasks were run)."""
    if not sparse:
        return ""
    lines = ["| task | metric | dense | sparse |", "|---|---|---|---|"]
    for line in card_task_results(dense, sparse):
        before = f"{100 * line['dense_value']:.2f}" if "dense_value" in line else "-"
        lines.append(f"| {line['task']} | {line['metric']} | {before} | {100 * line['sparse_value']:.2f} |")
    lines.append(f"(accuracy in %, lm-evaluation-harness {sparse['harness_version']}, {sparse['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def summary_table(dense: dict | None, sparse: dict, sparsity: float, output_dir: Path, elapsed_s: float,
                  checkpoint_dir: Path | None = None, start: tuple[str, Scores] | None = None) -> str:
    """Perplexity per text: dense, the one-shot start the run began from (with a warm start), sparse."""
    def ppl(scores: dict | None, name: str) -> str:
        return f"{scores[name]['perplexity']:.2f}" if scores and name in scores else "-"

    middle = [f"{start[0]} start ppl"] if start else []
    lines = ["| " + " | ".join(["text", "dense ppl", *middle, "sparse ppl"]) + " |", "|---" * (3 + len(middle)) + "|"]
    for name in sparse:
        cells = [name, ppl(dense, name), *([ppl(start[1].texts, name)] if start else []), ppl(sparse, name)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nsparsity of the target layers: {sparsity:.4f}   time: {elapsed_s:.0f} s")
    lines.append(f"saved to: {output_dir}")
    if checkpoint_dir is not None:
        lines.append(f"checkpoints: {checkpoint_dir}")
    return "\n".join(lines)
