"""Scores -> exact keep-masks: unstructured (per layer), global, per output row, and N:M (docs/METHOD.md, section 6).

Every function here is pure: it takes scores in (out_features, in_features) layout and returns boolean
keep-masks of the same shape. Ties are broken deterministically: among equal scores, the entry that
comes first (layer order, then row-major index) is pruned first.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch

PATTERNS = ("unstructured", "global", "row")
DEFAULT_SPARSITY = 0.5  # what "no sparsity given" means for every pattern but N:M, which fixes its own


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
        """The sparsity to prune to: N:M fixes it to (M - N) / M (an explicit other value is an error);
        otherwise `sparsity`, or DEFAULT_SPARSITY when it is None. The one place this rule lives."""
        if self.is_nm:
            implied = (self.m - self.n) / self.m
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {self} always gives sparsity {implied:g}; got sparsity={sparsity}. "
                                 f"Pass sparsity=None (N:M fixes it) or sparsity={implied!r}.")
            return implied
        if sparsity is None:
            return DEFAULT_SPARSITY
        check_sparsity(sparsity)
        return float(sparsity)

    def check_method(self, method: str, who: str | None = None) -> None:
        """'global' ranks the scores of every layer together, which is meaningful only for weight magnitudes
        (Wanda's and SparseGPT's scores compare within a layer or row): the one place this rule lives. `who`
        names the caller in the message (default: the method)."""
        if self.kind == "global" and method != "magnitude":
            raise ValueError(f"{who or method} compares scores within a layer (or row); pattern 'global' is only "
                             "meaningful for magnitude. Use 'unstructured', 'row' or N:M.")

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        if self.is_nm and shape[1] % self.m:
            raise ValueError(f"pattern {self} needs in_features divisible by {self.m}, but {name} has "
                             f"in_features={shape[1]}. Exclude that layer or pick another M.")


def check_sparsity(sparsity) -> None:
    # numbers.Real also admits numpy scalars (np.float32 is no float subclass); a bool is no fraction.
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r}: give the fraction of weights to remove, strictly between 0 and 1 "
                         "(0.5 removes half).")


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean 'pruned' flags for exactly the k lowest entries along the last dim of `score` (every row
    the same k; the first index goes first among equal scores).

    A k-th value threshold plus a running count of the ties at it: linear time and memory, where a stable
    argsort needs an int64 index per entry (8 bytes/weight; prohibitive for 'global' on large models)."""
    n = score.shape[-1]
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(score, k, dim=-1, keepdim=True).values
    below = score < threshold
    ties = score == threshold
    need = k - below.sum(dim=-1, keepdim=True)  # >= 1, and there are at least that many ties
    rank = torch.cumsum(ties, dim=-1, dtype=torch.int32 if n < 2**31 else torch.int64)
    return below | (ties & (rank <= need))


def keep_mask(score: torch.Tensor, sparsity: float | None, pattern: str | SparsityPattern) -> torch.Tensor:
    """Keep-mask of one layer for the per-layer patterns (unstructured, row, N:M)."""
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    _check_scores(score)
    score = score.detach().float()
    out_features, in_features = score.shape
    if pattern.kind in ("unstructured", "global"):
        pruned = _prune_lowest(score.flatten(), round(sparsity * score.numel())).view_as(score)
    elif pattern.kind == "row":
        pruned = _prune_lowest(score, round(sparsity * in_features))
    else:
        pattern.check_shape("this layer", (out_features, in_features))
        groups = score.view(out_features, in_features // pattern.m, pattern.m)
        pruned = _prune_lowest(groups, pattern.m - pattern.n).view_as(score)
    return ~pruned


def _check_scores(score: torch.Tensor, name: str = "this layer") -> None:
    if score.dim() != 2:
        raise ValueError(f"scores of {name} must be 2-D (out_features, in_features), got shape {tuple(score.shape)}.")
    if torch.isnan(score).any():
        raise ValueError(f"scores of {name} contain NaN (diverged weights?); nothing was pruned.")


@torch.no_grad()
def apply_keep_mask(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero `tensor` in place where `keep` is False: the one place pruned entries are written.

    masked_fill, not a multiplication: a pruned negative entry must become +0.0, not -0.0 (compressed
    checkpoints pay a bit per -0.0 to stay bit-exact). A sharded `tensor` (FSDP2's DTensor) takes a full
    `keep` cut to its own shard (`shard_like`) or a keep-mask already sharded like it."""
    return tensor.masked_fill_(~shard_like(keep, tensor), 0.0)


# ----- sharded parameters (FSDP2: DTensor parameters, Shard(0) over the processes) -----------------------

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch without distributed support, or older
    DTensor = distribute_tensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (a parameter FSDP2 shards over the processes)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise); no communication."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered, which every process of its mesh must call at the same time."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`keep` (the full mask, the same on every process) sharded like the DTensor `like`: each process cuts its
    own shard out of its own copy, with no communication. Unchanged if `like` is not sharded or `keep` is."""
    if not is_sharded(like) or is_sharded(keep):
        return keep
    if tuple(keep.shape) != tuple(like.shape):
        raise ValueError(f"keep-mask of shape {tuple(keep.shape)} for a tensor of shape {tuple(like.shape)}.")
    return distribute_tensor(keep.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def keep_masks(scores: dict[str, torch.Tensor], sparsity: float | None,
               pattern: str | SparsityPattern = "unstructured") -> dict[str, torch.Tensor]:
    """Keep-masks for all layers; `global` ranks every score of every layer together."""
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    for name, score in scores.items():
        _check_scores(score, name)
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
