"""OWL (Yin et al. 2023): non-uniform sparsity per decoder block from its share of outlier scores.

Blocks whose Wanda scores |W_ij|·||X_j|| have more outliers (entries above `threshold_m` times the
block's mean score) keep more weights. The outlier ratios D_l are rescaled linearly to [0, 2λ],
centered on the target keep ratio 1 − s, so block sparsities lie in [s − λ, s + λ] and average to s
(the model-wide sparsity equals s when blocks have equal sizes, as in standard decoders).
Statistics come from the dense model (one extra calibration pass), as in the OWL reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import sequential_blocks
from .wanda import ColumnNorms, wanda_scores


@dataclass
class OWLConfig:
    """Outlier-weighed layer-wise sparsity; pass to `oneshot_prune(..., owl=OWLConfig())`."""

    threshold_m: float = field(
        default=5.0,
        metadata={"help": "A score is an outlier when above threshold_m times its block's mean score (OWL's M)."},
    )
    max_deviation: float = field(
        default=0.08,
        metadata={"help": "λ: block sparsities range over [s − λ, s + λ] (OWL's Lambda)."},
    )

    def __post_init__(self):
        if not (isinstance(self.threshold_m, (int, float)) and self.threshold_m > 0):
            raise ValueError(f"threshold_m={self.threshold_m!r}: give a positive multiple of the mean score (5 is usual).")
        if not (isinstance(self.max_deviation, (int, float)) and 0 <= self.max_deviation < 0.5):
            raise ValueError(f"max_deviation={self.max_deviation!r}: give λ in [0, 0.5) (0.08 is usual).")


def outlier_ratio(scores: list[torch.Tensor], threshold_m: float) -> float:
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold_m * flat.mean()).float().mean())


def block_sparsities(ratios: list[float], sparsity: float, max_deviation: float) -> list[float]:
    """OWL's allocation: outlier ratios -> per-block sparsity in [s − λ, s + λ] with mean s."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    if spread <= 0 or max_deviation == 0:
        return [sparsity] * len(ratios)
    keep = (r - r.min()) / spread * (2 * max_deviation)
    keep = keep - keep.mean() + (1 - sparsity)
    out = (1 - keep).clamp(1e-6, 1 - 1e-6)
    return [float(s) for s in out]


@torch.no_grad()
def owl_block_sparsities(model, layers: dict, calibration_ids: torch.Tensor, sparsity: float,
                         config: OWLConfig, batch_size: int = 8) -> tuple[dict[int, float], dict[int, float]]:
    """({block index: sparsity}, {block index: outlier ratio}) for the blocks holding target layers."""
    ratios = {}
    for index, targets, collect in sequential_blocks(model, layers, calibration_ids, batch_size, recompute=False):
        stats = collect(lambda layer: ColumnNorms())
        scores = []
        for name, layer in targets.items():
            weight = layer.weight.t() if _is_conv1d(layer) else layer.weight
            scores.append(wanda_scores(weight, stats[name].norms()))
        ratios[index] = outlier_ratio(scores, config.threshold_m)
    indices = sorted(ratios)
    values = block_sparsities([ratios[i] for i in indices], sparsity, config.max_deviation)
    return dict(zip(indices, values)), ratios


def _is_conv1d(layer) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(layer, Conv1D)
