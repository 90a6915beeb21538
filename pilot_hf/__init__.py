"""pilot-hf: implicit sparsification (PILoT) for Hugging Face causal language models.

Pipeline: wrap (mask ⊙ weight) -> train (time-varying regularization) -> prune + merge -> evaluate -> publish.
The `pilot-hf` command line (pilot_hf.commands) is a thin layer over these names.
"""

from .card import CardInfo, card_info_for_run, render_model_card, write_model_card
from .config import PILoTConfig
from .data import EVALUATION_TEXTS, DataArguments, calibration_samples, evaluation_tokens, prepare_lm_datasets
from .evaluation import (
    EvalArguments,
    PerplexityResult,
    evaluate_model,
    heldout_perplexity,
    load_perplexity_metric,
    perplexity,
)
from .hub import push_to_hub
from .layers import MaskedLinear, pilot_init
from .loading import ModelArguments, load_model
from .methods import MethodSpec
from .oneshot import (
    MagnitudeConfig,
    OneShotArguments,
    OneShotReport,
    OWLConfig,
    SparseGPTConfig,
    WandaConfig,
    oneshot_prune,
)
from .pruning import SparsityPattern, apply_keep_mask, keep_mask, keep_masks
from .regularization import AlphaController
from .runs import latest_checkpoint  # checkpoint bookkeeping lives with the run protocol
from .serialization import compress_checkpoint, load_compressed, register_with_transformers, save_compressed
from .sweep import SweepArguments
from .trainer import PILoTTrainer
from .training_args import PILoTTrainingArguments
from .version import __version__
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

# Importing pilot_hf registers the compressed format with Transformers' from_pretrained (False, with a warning,
# when this Transformers lacks the private API it needs; load_compressed works either way).
HOOK_REGISTERED = register_with_transformers()

__all__ = [
    "__version__",
    "HOOK_REGISTERED",
    "EVALUATION_TEXTS",
    "EvalArguments",
    "MethodSpec",
    "ModelArguments",
    "OneShotArguments",
    "SweepArguments",
    "apply_keep_mask",
    "card_info_for_run",
    "evaluate_model",
    "latest_checkpoint",
    "load_model",
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
