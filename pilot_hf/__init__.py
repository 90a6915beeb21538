"""pilot-hf: implicit sparsification (PILoT) for Hugging Face causal language models.

Pipeline: wrap (mask ⊙ weight) -> train (time-varying regularization) -> prune + merge -> evaluate -> publish.
"""

from . import serialization  # registers the compressed format with Transformers' from_pretrained
from .config import PILoTConfig
from .hub import CardInfo, push_to_hub, render_model_card, write_model_card
from .layers import MaskedLinear, pilot_init
from .pruning import SparsityPattern, keep_mask, keep_masks
from .regularization import AlphaController
from .serialization import compress_checkpoint, load_compressed, save_compressed
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
    "CardInfo",
    "compress_checkpoint",
    "load_compressed",
    "push_to_hub",
    "render_model_card",
    "save_compressed",
    "write_model_card",
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
