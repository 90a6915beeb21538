"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with a weight update (docs/METHOD.md, section 7).

For one layer with inputs X (in_features x tokens) the layer-wise problem is
min ||WX − ŴX||²_F over Ŵ with the sparsity pattern. With H = 2XXᵀ/n (+ damping) and the upper
Cholesky factor U of H⁻¹, columns are processed left to right in blocks: pruning w_ij costs
w_ij² / U_jj², and the error (w − q)/U_jj of column j is pushed onto the columns not yet processed
through row j of U (the OBS update). All math is fp32.

Mask selection (exactness). The reference implementation selects, at the start of each block of
`blocksize` columns, the lowest w²/U_jj² of the (already updated) block with a threshold, which gives
about, not exactly, the target per layer. Here each block prunes exactly its share of the layer
target by cumulative rounding, round(s · rows · end) − round(s · rows · start), chosen by a stable
sort: the layer ends with exactly round(s · numel) zeros ('unstructured'), round(s · in_features)
per row ('row', per-row shares per block), or exactly M − N per group of M inputs ('N:M', chosen
when the group's first column is reached, as in the reference).

Dead inputs (never active on the calibration tokens, H_jj = 0) are handled as in the reference
(H_jj := 1) except that their weights are not zeroed wholesale: they cost nothing to prune, so they
score lowest and are pruned first within the target count, which keeps the count exact.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..pruning import SparsityPattern
from .calibration import InputStatistic


@dataclass
class SparseGPTConfig:
    """SparseGPT's options; the sparsity and pattern are arguments of `oneshot_prune`."""

    name: ClassVar[str] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True

    blocksize: int = field(
        default=128,
        metadata={"help": "Columns processed together (lazy batch updates); masks are chosen per block. "
                  "Must be a multiple of M for N:M patterns."},
    )
    percdamp: float = field(
        default=0.01,
        metadata={"help": "Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal."},
    )

    def __post_init__(self):
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize={self.blocksize!r}: give a positive number of columns (128 is usual).")
        if not (isinstance(self.percdamp, (int, float)) and 0 <= self.percdamp < float("inf")):
            raise ValueError(f"percdamp={self.percdamp!r}: give a fraction >= 0 of the mean Hessian diagonal "
                             "(0.01 is usual).")

    def check_pattern(self, pattern: SparsityPattern) -> None:
        if pattern.is_nm and self.blocksize % pattern.m:
            raise ValueError(f"blocksize={self.blocksize} is not a multiple of M={pattern.m} (pattern {pattern}); "
                             "N:M groups must not straddle blocks.")

    def new_statistic(self, layer) -> InputStatistic:
        return Hessian()

    def prune_weight(self, weight: torch.Tensor, stat: Hessian, sparsity: float,
                     pattern: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned and updated weight, keep-mask), both (out_features, in_features)."""
        return sparsegpt_prune_weight(weight, stat.matrix(), sparsity, pattern, self.blocksize, self.percdamp)


class Hessian(InputStatistic):
    """H = 2 X Xᵀ / n over the calibration tokens, accumulated in fp32."""

    def __init__(self):
        self.xtx: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        xtx = x.t() @ x
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.xtx is None:
            raise RuntimeError("this layer saw no calibration tokens; it is not called by its block's forward.")
        return self.xtx * (2.0 / self.tokens)


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹; the damping grows 10x per retry if H is not positive definite."""
    damp = percdamp * torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp = damp * 10 if damp > 0 else torch.diag(H).mean() * 1e-4 + 1e-8
    raise RuntimeError("the Hessian stays singular after dampening; give more (or more varied) calibration tokens "
                       "or raise percdamp.")


def _share(total_fraction: float, rows: int, start: int, end: int) -> int:
    """Entries to prune in columns [start, end) so that cumulative counts round exactly (see module doc)."""
    return round(total_fraction * (rows * end)) - round(total_fraction * (rows * start))


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of small ops: on CPU, intra-op threads cost more than they gain (~30x
    slower when another process holds the cores), so it runs on one thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                           pattern: str | SparsityPattern = "unstructured", blocksize: int = 128,
                           percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight (out_features, in_features) given H = 2XXᵀ/n (in_features²).

    Returns (new weight in the input dtype, boolean keep-mask). Pruned entries are exactly 0.
    """
    with torch.no_grad(), _one_cpu_thread(weight.device):
        return _sparsegpt(weight, hessian, sparsity, pattern, blocksize, percdamp)


def _sparsegpt(weight, hessian, sparsity, pattern, blocksize, percdamp):
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    pattern.check_method("sparsegpt")
    pattern.check_shape("this layer", tuple(weight.shape))
    if pattern.is_nm and blocksize % pattern.m:
        raise ValueError(f"blocksize={blocksize} is not a multiple of M={pattern.m}.")
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    H = hessian.detach().float().clone().to(W.device)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(H.shape)}, expected ({cols}, {cols}).")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    U = _inverse_cholesky_upper(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    row_index = torch.arange(rows, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        dead1 = dead[i1:i2]
        mask1 = torch.zeros(rows, count, dtype=torch.bool, device=W.device)

        if not pattern.is_nm:
            score = W1.pow(2) / d.pow(2).unsqueeze(0)
            score[:, dead1] = -1.0  # free to prune: pruned first
            if pattern.kind == "unstructured":
                k = _share(sparsity, rows, i1, i2)
                if k > 0:
                    mask1.view(-1)[torch.argsort(score.flatten(), stable=True)[:k]] = True
            else:  # 'row': each row prunes its own share of round(s · in_features)
                k = round(sparsity * i2) - round(sparsity * i1)
                if k > 0:
                    mask1.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], True)

        d_list = d.tolist()
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                group = W1[:, i:i + pattern.m].pow(2) / d[i:i + pattern.m].pow(2).unsqueeze(0)
                group[:, dead1[i:i + pattern.m]] = -1.0
                lowest = torch.argsort(group, dim=1, stable=True)[:, :pattern.m - pattern.n]
                mask1[row_index.unsqueeze(1), i + lowest] = True
            # err = (w − q) / U_ii with q = w at kept entries and 0 at pruned ones.
            err = Err1[:, i]
            torch.mul(W1[:, i], mask1[:, i], out=err)
            err.div_(d_list[i])
            # OBS update of this block's remaining columns; column i itself becomes q (pruned entries ~0).
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i].masked_fill_(mask1[:, i], 0.0)

        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        # Lazy batch update of every later column.
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    W[pruned] = 0.0
    if not torch.isfinite(W).all():
        raise RuntimeError("SparseGPT produced non-finite weights; the Hessian is ill-conditioned (raise percdamp).")
    return W.to(weight.dtype), ~pruned


def layer_reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, inputs: torch.Tensor) -> float:
    """||W X − Ŵ X||_F for inputs X given as rows (tokens, in_features)."""
    diff = (weight.float() - new_weight.float()) @ inputs.float().t()
    return math.sqrt(float(diff.pow(2).sum()))
