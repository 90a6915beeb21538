"""What the commands write and print about a run: its record, the card's results, the summary table."""

from __future__ import annotations

from pathlib import Path

from ..runs import redact_argv


def run_record(command: str, argv, **parts) -> dict:
    """run_config.json: the run settings record (`settings`) with the inputs that produced it, and the
    command line with every token redacted."""
    from .. import __version__

    return {"pilot_hf_version": __version__, "command": " ".join(redact_argv(["pilot-hf", command, *argv])),
            **parts}


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
                  checkpoint_dir: Path | None = None) -> str:
    lines = ["| text | dense ppl | sparse ppl |", "|---|---|---|"]
    for name, r in sparse.items():
        d = f"{dense[name]['perplexity']:.2f}" if dense else "-"
        lines.append(f"| {name} | {d} | {r['perplexity']:.2f} |")
    lines.append(f"\nsparsity of the target layers: {sparsity:.4f}   time: {elapsed_s:.0f} s")
    lines.append(f"saved to: {output_dir}")
    if checkpoint_dir is not None:
        lines.append(f"checkpoints: {checkpoint_dir}")
    return "\n".join(lines)
