"""HAM, Hyperbolic Aware Minimization (Jacobs, Gadhikar, Rubio-Madrigal & Burkholz, ICLR 2026, arXiv 2506.02630),
in the strength units of docs/METHOD.md section 11.

After the base optimizer's step, every target matrix x gets a multiplicative mirror step

    x ← x · exp(clamp(−lr · (α · sign(x) · g / RMS(g) + β), −5, 5))

with g = ∂f/∂x (the gradient the base optimizer stepped with), lr its parameter group's learning rate and RMS
over the whole tensor. Exactly-zero entries stay exactly zero. For x = mask ⊙ weight the factor goes on the
weight, with g = weight.grad / mask: the product then moves as a plain weight would.
"""

from __future__ import annotations

import math
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
    # Two passes, so that at most one gradient temporary (mask ⊙ weight: weight.grad / |m|) is alive at a time.
    sum_sq = torch.stack([torch.linalg.vector_norm(_signed_grad(t), dtype=torch.float32) ** 2 for t in targets])
    _sum_over_shards(sum_sq, [t.weight for t in targets])
    rms = (sum_sq / torch.tensor([float(t.weight.numel()) for t in targets], device=sum_sq.device)).sqrt()
    # The exponent in base 2 (exp2 is cheaper than exp): −lr·(α·sign(x)·g/RMS + β)·log2(e), clamped to ±5·log2(e).
    # A tensor whose gradient is all zero gets no α-term.
    log2e = 1.0 / math.log(2.0)
    inverse_rms = torch.where(rms > 0, 1.0 / rms.clamp_min(torch.finfo(torch.float32).tiny), 0.0).tolist()
    buffer = torch.empty(max(local_tensor(t.weight).numel() for t in targets), dtype=torch.float32,
                         device=local_tensor(targets[0].weight).device)  # one exponent buffer for every tensor
    for t, inverse in zip(targets, inverse_rms):
        weight = local_tensor(t.weight)
        exponent = buffer[:weight.numel()].view(weight.shape)
        if weight.dtype == exponent.dtype:
            torch.sign(weight, out=exponent)
        else:  # bf16/fp16 weights: the exponent is still computed in fp32
            exponent.copy_(weight).sign_()
        torch.addcmul(torch.tensor(-t.lr * beta * log2e, device=exponent.device), exponent, _signed_grad(t),
                      value=-t.lr * alpha * inverse * log2e, out=exponent)
        weight.mul_(exponent.clamp_(-EXPONENT_CLAMP * log2e, EXPONENT_CLAMP * log2e).exp2_())


def skipped_by_grad_scaler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this step found inf/NaN gradients. GradScaler skips `step()` of most optimizers (no hook runs),
    but calls it on fused ones (AdamW(fused=True), Trainer's default) with `found_inf` set, and they skip
    inside: the post-step hook must skip too. (A still-scaled gradient needs nothing: g / RMS(g) is
    scale-free.)"""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf)


def _signed_grad(t: HAMTarget) -> torch.Tensor:
    """g with sign(x)·g = sign(w)·g, for this process's shard: the weight's gradient, or, for x = m ⊙ w,
    ∂f/∂x·sign(m) = weight.grad / |m| (the chain rule gives weight.grad = ∂f/∂x·m); 0 where m = 0, where x = 0
    and no factor can move it. Same RMS as ∂f/∂x."""
    grad = local_tensor(t.weight.grad)
    if t.mask is None:
        return grad
    mask = local_tensor(t.mask).abs()
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
