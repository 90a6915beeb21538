"""Which N:M pattern a sparse model already follows (next to `wrapping.sparsity_report`, which counts its zeros).

A model pruned by any tool carries no metadata; its pattern is read from the zeros: `2:4` if every group of 4
consecutive input weights of every target layer holds at least 2 zeros, and so on.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PILoTConfig
from .wrapping import find_target_layers, out_in_layout

DETECTED_PATTERNS = ((2, 4), (4, 8))  # the patterns sparse kernels accelerate, checked in this order


@torch.no_grad()
def follows_pattern(model: nn.Module, n: int, m: int, config: PILoTConfig | None = None) -> bool:
    """Whether every target layer has at least m - n zeros in each group of m inputs ((out, in) layout)."""
    for layer in find_target_layers(model, config).values():
        w = out_in_layout(layer.weight, layer)
        if w.shape[1] % m or not bool(((w.reshape(w.shape[0], -1, m) == 0).sum(-1) >= m - n).all()):
            return False
    return True


def detect_pattern(model: nn.Module, config: PILoTConfig | None = None) -> str:
    """'2:4' or '4:8' if every target layer follows it, else 'unstructured'."""
    for n, m in DETECTED_PATTERNS:
        if follows_pattern(model, n, m, config):
            return f"{n}:{m}"
    return "unstructured"
