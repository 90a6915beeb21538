"""Arguments that only the commands have (the library's own live beside the code they configure:
ModelArguments in loading.py, DataArguments in data.py, EvalArguments in evaluation.py,
PILoTTrainingArguments in training_args.py, OneShotArguments in oneshot/, SweepArguments in sweep.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunArguments:
    """Where a training run keeps its checkpoints, and whether it may replace an earlier result."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace output_dir if it holds an earlier pilot-hf result (a folder pilot-hf did not write is "
                "never replaced)."})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "Where Trainer checkpoints go (save_strategy); default: '<output_dir>-checkpoints' beside "
                "output_dir. The result folder holds the model only; checkpoints are kept for resuming."})


@dataclass
class OutputArguments:
    """Where a one-shot run's result goes."""

    output_dir: str = field(default="outputs/oneshot", metadata={"help": "Where the pruned model is saved."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace output_dir if it holds an earlier pilot-hf result (a folder pilot-hf did not write is "
                "never replaced)."})


@dataclass
class EvaluateArguments:
    """Where to write the evaluation results (optional)."""

    output_file: str | None = field(default=None, metadata={"help": "Write the perplexities as JSON here."})


@dataclass
class PushArguments:
    output_dir: str = field(metadata={"help": "Folder a pilot-hf run (or save_pretrained) wrote."})
    repo_id: str = field(metadata={"help": "Hub repository, 'namespace/name'."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    compressed: bool = field(default=False, metadata={
        "help": "Upload the compressed sparse format (built in a temporary folder; output_dir is not changed)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if needed)."})
    dry_run: bool = field(default=False, metadata={"help": "Only list the files and sizes that would be uploaded."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
