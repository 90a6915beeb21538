"""Magnitude pruning: keep the largest |W| (no calibration data). The simplest baseline (METHOD.md, section 7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pruning import SparsityPattern, keep_mask


@dataclass
class MagnitudeConfig:
    """Magnitude pruning has no options; `oneshot_prune` applies it with `pilot_hf.magnitude_prune`."""

    name: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    def new_statistic(self, layer):
        return None

    def prune_weight(self, weight: torch.Tensor, stat, sparsity: float,
                     pattern: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned weight, keep-mask) for one layer; used when layers get different sparsities (OWL)."""
        keep = keep_mask(weight.abs(), sparsity, pattern)
        return weight.masked_fill(~keep, 0.0), keep
