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
    """Held-out perplexities in the model card's form (built-in texts are named, not Hub datasets)."""
    return [{"dataset": f"pilot-hf/builtin-{name}", "dataset_name": f"{name} (held-out part, built-in text)",
             "split": "test", "sparse_perplexity": r["perplexity"],
             **({"dense_perplexity": dense[name]["perplexity"]} if dense else {})} for name, r in sparse.items()]


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
