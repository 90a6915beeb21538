"""HAM, Hyperbolic Aware Minimization (Jacobs, Gadhikar, Rubio-Madrigal & Burkholz, ICLR 2026, arXiv 2506.02630),
in the strength units of docs/METHOD.md section 11.

After the base optimizer's step, every target matrix x gets a multiplicative mirror step

    x ← x · exp(clamp(−lr · (α · sign(x) · g / RMS(g) + β), −5, 5))

with g = ∂f/∂x (the gradient the base optimizer stepped with), lr its parameter group's learning rate and RMS
over the whole tensor. Exactly-zero entries stay exactly zero. For x = mask ⊙ weight the factor goes on the
weight, with g = weight.grad / mask: the product then moves as a plain weight would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pruning import is_sharded, local_tensor

EXPONENT_CLAMP = 5.0  # the authors' clamp: one step scales an entry by at most e^5


@dataclass
class HAMTarget:
    """One target matrix: `weight` is scaled; `mask` is set when the matrix is mask ⊙ weight."""

    weight: torch.Tensor
    mask: torch.Tensor | None
    lr: float


@torch.no_grad()
def ham_step(targets: list[HAMTarget], alpha: float, beta: float) -> None:
    """One HAM step on every target that has a gradient. Sharded (FSDP2) targets need every process of their
    mesh to call this together: each tensor's squared gradient is summed over its shards."""
    targets = [t for t in targets if t.weight.grad is not None]
    if not targets:
        return
    # Two passes, one gradient temporary alive at a time (x = m ⊙ w computes weight.grad / m in each).
    sum_sq = torch.stack([torch.linalg.vector_norm(_effective_grad(t), dtype=torch.float32) ** 2 for t in targets])
    _sum_over_shards(sum_sq, [t.weight for t in targets])
    numel = torch.tensor([t.weight.numel() for t in targets], dtype=torch.float32, device=sum_sq.device)
    rms = (sum_sq / numel).sqrt()
    lrs = torch.tensor([t.lr for t in targets], dtype=torch.float32, device=sum_sq.device)
    # −lr·α/RMS per tensor, kept on the device (no sync); a tensor with no gradient at all gets no α-term.
    scales = torch.where(rms > 0, -lrs * alpha / rms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    for t, scale in zip(targets, scales):
        weight = local_tensor(t.weight)
        exponent = weight.sign().float().mul_(_effective_grad(t)).mul_(scale)  # sign(x) = sign(w) for mask > 0
        if t.mask is not None:
            exponent.mul_(local_tensor(t.mask).sign())  # sign(x) = sign(m)·sign(w) in general
        exponent.sub_(t.lr * beta).clamp_(-EXPONENT_CLAMP, EXPONENT_CLAMP)
        weight.mul_(exponent.exp_())


def skipped_by_grad_scaler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this step found inf/NaN gradients. GradScaler skips `step()` of most optimizers (no hook runs),
    but calls it on fused ones (AdamW(fused=True), Trainer's default) with `found_inf` set, and they skip
    inside: the post-step hook must skip too. (A still-scaled gradient needs nothing: g / RMS(g) is
    scale-free.)"""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf)


def _effective_grad(t: HAMTarget) -> torch.Tensor:
    """∂f/∂x of this process's shard: the weight's gradient, or, for x = m ⊙ w, weight.grad / m (0 where m = 0,
    where x = 0 and no factor can move it)."""
    grad = local_tensor(t.weight.grad)
    if t.mask is None:
        return grad
    mask = local_tensor(t.mask)
    return torch.where(mask != 0, grad / mask, 0.0)


def _sum_over_shards(values: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Add up per-tensor partial sums over the processes that hold the tensors' shards (FSDP2: the mesh
    dimensions with a Shard placement). Unsharded tensors (one process, DDP) are whole already."""
    sharded = [t for t in tensors if is_sharded(t)]
    if not sharded:
        return
    if len(sharded) != len(tensors) or any(t.device_mesh != sharded[0].device_mesh
                                           or t.placements != sharded[0].placements for t in sharded):
        raise ValueError("HAM needs every target tensor sharded alike (one FSDP2 mesh and placement).")
    mesh = sharded[0].device_mesh
    for dim, placement in enumerate(sharded[0].placements):
        if placement.is_shard():
            torch.distributed.all_reduce(values, group=mesh.get_group(dim))
