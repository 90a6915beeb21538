"""AdamW with an optional second moment per tensor, for masks and target weights.

Adam divides every coordinate's gradient by its own running RMS, so each coordinate moves by about the
learning rate per step whatever its gradient (docs/METHOD.md, section 8). PILoT's implicit bias is derived
for gradient flow, where a coordinate moves in proportion to its gradient: the L2 term shrinks every
mask/weight by the same factor and only the data gradient decides which ones hold. With one second
moment per tensor ("tensorwise"), updates inside a tensor stay proportional to the gradients, as in
gradient flow, while the step size still adapts per tensor (a per-layer time rescaling); no coordinate
moves by more than the learning rate per step, as with Adam. It also stores one number instead of a
tensor for the second moment of every mask and weight.
"""

from __future__ import annotations

import torch


class TensorwiseAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW` (decoupled weight decay, bias correction) where a parameter group with
    `tensorwise=True` keeps one second-moment scalar per tensor (the running mean of `grad²` over the
    tensor) and clamps each coordinate's normalized update to [-1, 1], i.e. at most lr per step.
    Groups with `tensorwise=False` (the default) are plain AdamW, entry by entry.

    Under FSDP a "tensor" is the local shard: the scalar is the shard's own mean.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, tensorwise: bool = False):
        if not lr >= 0 or not eps >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"TensorwiseAdamW: need lr >= 0, eps >= 0 and 0 <= betas < 1; got {lr}, {eps}, {betas}.")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "tensorwise": tensorwise})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = (torch.zeros((), dtype=torch.float32, device=p.device) if group["tensorwise"]
                                           else torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                step = float(state["step"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                square = grad.square().mean() if state["exp_avg_sq"].dim() == 0 else grad.square()
                state["exp_avg_sq"].mul_(beta2).add_(square, alpha=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                update = state["exp_avg"].div(denom).div_(1 - beta1 ** step)
                if group["tensorwise"]:
                    # Gradients are heavy-tailed: divided by the tensor's RMS, an outlier coordinate would move
                    # by ~100x lr (that wrecked SmolLM2 in 4 steps). Cap it at lr, Adam's own typical bound;
                    # every coordinate below the cap keeps an update proportional to its gradient.
                    update.clamp_(-1.0, 1.0)
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss
