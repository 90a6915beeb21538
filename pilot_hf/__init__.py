"""pilot-hf: implicit sparsification (PILoT) for Hugging Face causal language models.

Pipeline: wrap (mask ⊙ weight) -> train (time-varying regularization) -> prune + merge -> evaluate -> publish.
"""

from . import serialization  # noqa: F401  (registers the compressed format with Transformers' from_pretrained)
from .config import PILoTConfig
from .data import EVALUATION_TEXTS, DataArguments, calibration_samples, evaluation_tokens, prepare_lm_datasets
from .evaluation import PerplexityResult, heldout_perplexity, load_perplexity_metric, perplexity
from .hub import CardInfo, push_to_hub, render_model_card, write_model_card
from .layers import MaskedLinear, pilot_init
from .oneshot import MagnitudeConfig, OneShotReport, OWLConfig, SparseGPTConfig, WandaConfig, oneshot_prune
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
    "EVALUATION_TEXTS",
    "AlphaController",
    "CardInfo",
    "DataArguments",
    "MagnitudeConfig",
    "MaskedLinear",
    "OWLConfig",
    "OneShotReport",
    "SparseGPTConfig",
    "WandaConfig",
    "oneshot_prune",
    "PILoTConfig",
    "PILoTTrainer",
    "PILoTTrainingArguments",
    "PerplexityResult",
    "SparsityPattern",
    "calibration_samples",
    "compress_checkpoint",
    "evaluation_tokens",
    "find_target_layers",
    "heldout_perplexity",
    "is_wrapped",
    "keep_mask",
    "keep_masks",
    "load_compressed",
    "load_perplexity_metric",
    "magnitude_prune",
    "masked_layers",
    "merge_and_unload",
    "perplexity",
    "pilot_init",
    "prepare_lm_datasets",
    "prune_model",
    "push_to_hub",
    "render_model_card",
    "save_compressed",
    "sparsity_report",
    "wrap_model",
    "write_model_card",
]
