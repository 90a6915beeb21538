"""Arguments that only the commands have (the library's own live beside the code they configure:
ModelArguments in loading.py, DataArguments in data.py, EvalArguments in evaluation.py,
PILoTTrainingArguments in training_args.py, OneShotArguments in oneshot/, SweepArguments in sweep.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OverwriteArguments:
    """Whether a command may replace an earlier result."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace output_dir if it holds an earlier pilot-hf result (a folder pilot-hf did not write is "
                "never replaced)."})


@dataclass
class RunArguments(OverwriteArguments):
    """Where a training run keeps its checkpoints, and whether it may replace an earlier result."""

    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "Where Trainer checkpoints go (save_strategy); default: '<output_dir>-checkpoints' beside "
                "output_dir. The result folder holds the model only; checkpoints are kept for resuming."})


@dataclass
class FinetuneArguments:
    """Full fine-tuning or LoRA."""

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

    def lora_config(self, model, config):
        """The peft.LoraConfig of these settings for `model` (default targets: `config`'s layers)."""
        from ..lora import sparse_lora_config

        return sparse_lora_config(model, self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules,
                                  config)

    def settings(self) -> dict:
        """For the run settings record: the mode, and the LoRA settings when LoRA ran."""
        if not self.lora:
            return {"lora": False}
        return {"lora": True, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "lora_target_modules": self.lora_target_modules or "pilot-hf targets (all-linear)"}


@dataclass
class OutputArguments(OverwriteArguments):
    """Where a one-shot run's result goes."""

    output_dir: str = field(default="outputs/oneshot", metadata={"help": "Where the pruned model is saved."})


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
