"""pilot-hf: implicit sparsification (PILoT) for Hugging Face causal language models.

Pipeline: wrap (mask ⊙ weight) -> train (time-varying regularization) -> prune + merge -> evaluate -> publish.
"""

from .config import PILoTConfig
from .layers import MaskedLinear, pilot_init
from .pruning import SparsityPattern, keep_mask, keep_masks
from .regularization import AlphaController
from .trainer import PILoTTrainer
from .training_args import PILoTTrainingArguments
from .wrapping import (
    find_target_layers,
    is_wrapped,
    magnitude_prune,
    masked_layers,
    merge_and_unload,
    prune_model,
    sparsity_report,
    wrap_model,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaController",
    "MaskedLinear",
    "PILoTTrainer",
    "PILoTTrainingArguments",
    "PILoTConfig",
    "SparsityPattern",
    "find_target_layers",
    "is_wrapped",
    "keep_mask",
    "keep_masks",
    "magnitude_prune",
    "masked_layers",
    "merge_and_unload",
    "pilot_init",
    "prune_model",
    "sparsity_report",
    "wrap_model",
]
