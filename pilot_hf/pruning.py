"""Scores -> exact keep-masks: unstructured (per layer), global, per output row, and N:M (METHOD.md, section 6).

Every function here is pure: it takes scores in (out_features, in_features) layout and returns boolean
keep-masks of the same shape. Ties are broken deterministically: among equal scores, the entry that
comes first (layer order, then row-major index) is pruned first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PATTERNS = ("unstructured", "global", "row")


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed pattern: 'unstructured' | 'global' | 'row' | 'N:M' (keep N of every M consecutive inputs)."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, spec: str | SparsityPattern) -> SparsityPattern:
        if isinstance(spec, SparsityPattern):
            return spec
        spec = str(spec).strip().lower()
        if spec in PATTERNS:
            return cls(spec)
        match = re.fullmatch(r"(\d+):(\d+)", spec)
        if not match:
            raise ValueError(f"sparsity pattern {spec!r} is not known; use one of {PATTERNS} or 'N:M' like '2:4'.")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {spec!r}: N:M needs 0 < N < M (e.g. '2:4' keeps 2 of every 4 weights).")
        return cls("nm", n, m)

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else self.kind

    def resolve_sparsity(self, sparsity: float | None) -> float:
        """The sparsity this pattern produces; N:M fixes it to (M - N) / M."""
        if self.is_nm:
            implied = (self.m - self.n) / self.m
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {self} always gives sparsity {implied:g}; got sparsity={sparsity}. "
                                 "Leave sparsity unset or set it to that value.")
            return implied
        check_sparsity(sparsity)
        return float(sparsity)

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        if self.is_nm and shape[1] % self.m:
            raise ValueError(f"pattern {self} needs in_features divisible by {self.m}, but {name} has "
                             f"in_features={shape[1]}. Exclude that layer or pick another M.")


def check_sparsity(sparsity) -> None:
    if sparsity is None or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r}: give the fraction of weights to remove, strictly between 0 and 1 "
                         "(0.5 removes half).")


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean 'pruned' flags for exactly the k lowest entries of a flat score (first index first on ties)."""
    pruned = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return pruned
    if k >= score.numel():
        return ~pruned
    # argsort(stable) puts equal scores in index order, so the earliest ties are pruned first.
    pruned[torch.argsort(score, stable=True)[:k]] = True
    return pruned


def keep_mask(score: torch.Tensor, sparsity: float | None, pattern: str | SparsityPattern) -> torch.Tensor:
    """Keep-mask of one layer for the per-layer patterns (unstructured, row, N:M)."""
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    score = score.detach().float()
    out_features, in_features = score.shape
    if pattern.kind in ("unstructured", "global"):
        pruned = _prune_lowest(score.flatten(), round(sparsity * score.numel())).view_as(score)
    elif pattern.kind == "row":
        k = round(sparsity * in_features)
        order = torch.argsort(score, dim=1, stable=True)
        pruned = torch.zeros_like(score, dtype=torch.bool)
        pruned.scatter_(1, order[:, :k], True)
    else:
        pattern.check_shape("this layer", (out_features, in_features))
        groups = score.view(out_features, in_features // pattern.m, pattern.m)
        order = torch.argsort(groups, dim=2, stable=True)
        pruned = torch.zeros_like(groups, dtype=torch.bool)
        pruned.scatter_(2, order[..., : pattern.m - pattern.n], True)
        pruned = pruned.view_as(score)
    return ~pruned


def keep_masks(scores: dict[str, torch.Tensor], sparsity: float | None,
               pattern: str | SparsityPattern = "unstructured") -> dict[str, torch.Tensor]:
    """Keep-masks for all layers; `global` ranks every score of every layer together."""
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    for name, score in scores.items():
        pattern.check_shape(name, tuple(score.shape))
    if pattern.kind != "global":
        return {name: keep_mask(score, sparsity, pattern) for name, score in scores.items()}
    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores.values()])
    pruned = _prune_lowest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = ~pruned[start:start + score.numel()].view(score.shape).to(score.device)
        start += score.numel()
    return masks
