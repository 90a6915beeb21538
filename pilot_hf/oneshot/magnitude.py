"""Magnitude pruning: keep the largest |W| (no calibration data). The simplest baseline (docs/METHOD.md, section 7)."""

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
        """(weight, keep-mask) for one layer; used when layers get different sparsities (OWL). The caller
        zeroes the pruned entries (`pilot_hf.pruning.apply_keep_mask`)."""
        return weight, keep_mask(weight.abs(), sparsity, pattern)
