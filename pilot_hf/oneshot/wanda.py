"""Wanda (Sun et al. 2023): prune by |W_ij| · ||X_j||_2, compared within each output row (docs/METHOD.md, section 7).

No weight update: the score only reweights magnitude by how large each input feature is on the
calibration tokens, so features with large activations keep more of their weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..pruning import SparsityPattern, keep_mask
from .calibration import InputStatistic

COMPARISONS = ("row", "layer")


@dataclass
class WandaConfig:
    """Wanda's options; the sparsity and pattern are arguments of `oneshot_prune`."""

    name: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True

    comparison: str = field(
        default="row",
        metadata={"help": "Group in which scores compete for the unstructured pattern: 'row' (each output row "
                  "loses the same share, Wanda's default and better on LLMs) or 'layer' (the whole layer). "
                  "Patterns 'row' and N:M fix the group themselves."},
    )

    def __post_init__(self):
        if self.comparison not in COMPARISONS:
            raise ValueError(f"comparison={self.comparison!r}; use one of {COMPARISONS}.")

    def new_statistic(self, layer) -> InputStatistic:
        return ColumnNorms()

    def prune_weight(self, weight: torch.Tensor, stat: ColumnNorms, sparsity: float,
                     pattern: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, keep-mask), both (out_features, in_features); the caller zeroes the pruned entries."""
        score = wanda_scores(weight, stat.norms())
        if pattern.kind == "unstructured" and self.comparison == "row":
            keep = row_balanced_keep_mask(score, sparsity)
        else:
            keep = keep_mask(score, sparsity, pattern)
        return weight, keep


class ColumnNorms(InputStatistic):
    """Sum over calibration tokens of x_j² per input feature j."""

    def __init__(self):
        self.sum_sq: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        sq = x.float().pow(2).sum(0)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        """||X_j||_2 over the calibration tokens (the layer never ran: no statistic)."""
        if self.sum_sq is None:
            raise RuntimeError("this layer saw no calibration tokens; it is not called by its block's forward.")
        return self.sum_sq.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ||X_j||_2, weight in (out_features, in_features) layout."""
    return weight.detach().float().abs() * input_norms.to(weight.device).float().unsqueeze(0)


def row_balanced_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the lowest scores of each row, with exactly round(sparsity · numel) zeros per layer.

    Every row prunes floor(sparsity · in_features) entries; the remainder (fewer than out_features) goes
    one each to the rows whose next-lowest score is smallest. Rows differ by at most one pruned entry;
    with sparsity · in_features an integer this is exactly the 'row' pattern.
    """
    out_features, in_features = score.shape
    total = round(sparsity * (out_features * in_features))
    base = min(total // out_features, in_features)
    extra = total - base * out_features
    order = torch.argsort(score, dim=1, stable=True)
    pruned = torch.zeros_like(score, dtype=torch.bool)
    pruned.scatter_(1, order[:, :base], True)
    if extra > 0:
        next_index = order[:, base]
        next_score = score.gather(1, next_index.unsqueeze(1)).squeeze(1)
        rows = torch.argsort(next_score, stable=True)[:extra]
        pruned[rows, next_index[rows]] = True
    return ~pruned
