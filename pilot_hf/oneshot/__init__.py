"""One-shot pruning baselines (no training): magnitude, Wanda, SparseGPT, optional OWL block sparsities.

    report = oneshot_prune(model, calibration_ids, method="sparsegpt", sparsity=0.5, pattern="2:4")
"""

from .calibration import find_decoder_blocks, sequential_blocks
from .magnitude import MagnitudeConfig
from .owl import OWLConfig
from .prune import METHODS, OneShotArguments, OneShotReport, oneshot_prune
from .sparsegpt import SparseGPTConfig, sparsegpt_prune_weight
from .wanda import WandaConfig, row_balanced_keep_mask, wanda_scores

__all__ = [
    "METHODS",
    "MagnitudeConfig",
    "OWLConfig",
    "OneShotArguments",
    "OneShotReport",
    "SparseGPTConfig",
    "WandaConfig",
    "find_decoder_blocks",
    "oneshot_prune",
    "row_balanced_keep_mask",
    "sequential_blocks",
    "sparsegpt_prune_weight",
    "wanda_scores",
]
