"""The masked layer: a linear layer whose weight is the product `mask ⊙ weight` (docs/METHOD.md, section 1)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def pilot_init(W: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve m ⊙ w = W and m² − w² = β elementwise, in fp32 (docs/METHOD.md, section 2).

    m0 = sqrt((β + sqrt(β² + 4W²)) / 2), w0 = W / m0. β = 0 is the balanced spred start
    (m0 = sqrt|W|, w0 = sign(W) sqrt|W|); there W = 0 gives m0 = w0 = 0.
    """
    W32 = W.detach().float()
    mask = _pilot_mask(W32, beta)
    return mask, _solve_weight(W32, mask)


def _pilot_mask(W32: torch.Tensor, beta: float) -> torch.Tensor:
    # hypot(β, 2W) = sqrt(β² + 4W²) without squaring: W² underflows for |W| < ~1e-19, which with β = 0
    # would give m0 = w0 = 0 and silently drop that weight.
    return torch.sqrt((beta + torch.hypot(W32.new_tensor(beta), 2 * W32)) / 2)


def _solve_weight(W32: torch.Tensor, mask32: torch.Tensor) -> torch.Tensor:
    """w0 = W / m0, and 0 where m0 = 0 (only W = 0 with β = 0)."""
    weight = W32 / mask32
    return weight.masked_fill_(mask32 == 0, 0.0)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in for this input, or None (no autocast, or an input
    autocast leaves alone: not floating point, or float64)."""
    device = t.device.type
    if (t.is_floating_point() and t.dtype != torch.float64 and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)):
        return torch.get_autocast_dtype(device)
    return None


class _MaskedLinearFn(torch.autograd.Function):
    """`F.linear(input, mask ⊙ weight, bias)` that saves (input, mask, weight) and recomputes the product
    in backward, instead of keeping it alive between forward and backward as plain autograd does.

    mask and weight are Parameters, so saving them costs no memory. The forward computes exactly what
    `MaskedLinear.merged_weight()` and plain autograd (also under autocast) compute, so outputs are
    bit-identical; the backward does the matmuls in the dtype the forward used (the autocast dtype if any)
    and follows plain autograd's casts, so gradients match it up to the summation order of the matmuls.
    """

    @staticmethod
    def forward(ctx, input, mask, weight, bias, transposed):
        ctx.transposed, ctx.input_dtype = transposed, input.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        W = (mask * weight).to(weight.dtype)  # as merged_weight()
        W = W.t() if transposed else W  # (out, in)
        compute = _autocast_dtype(input)
        if compute is not None:  # what autocast does to F.linear's arguments; cast once, save the cast input
            input, W = input.to(compute), W.to(compute)
            bias = bias.to(compute) if bias is not None else None
        out = F.linear(input, W, bias)
        ctx.compute_dtype = out.dtype
        # Plain autograd keeps the input only when a weight gradient is wanted; so do we.
        needs_weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(input if needs_weight_grad else None, mask, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, mask, weight = ctx.saved_tensors
        needs_input, needs_mask, needs_weight, needs_bias, _ = ctx.needs_input_grad
        device = grad_out.device.type
        # Backward normally runs outside autocast; if it does not, keep autocast from re-casting our matmuls.
        with torch.autocast(device, enabled=False) if (torch.amp.is_autocast_available(device)
                                                         and torch.is_autocast_enabled(device)) else nullcontext():
            g = grad_out.to(ctx.compute_dtype)
            g2 = g.reshape(-1, g.shape[-1])  # (N, out)
            grad_input = grad_mask = grad_weight = grad_bias = None
            if needs_input:
                W = (mask * weight).to(weight.dtype).to(ctx.compute_dtype)  # recomputed
                grad_input = torch.matmul(g, W.t() if ctx.transposed else W).to(ctx.input_dtype)
                del W  # free it before the weight gradients are allocated
            if needs_mask or needs_weight:
                x2 = input.reshape(-1, input.shape[-1])  # (N, in)
                grad_W = x2.t() @ g2 if ctx.transposed else g2.t() @ x2  # the stored layout
                # Plain autograd: back through .to(compute), .to(weight.dtype), then the product, taken in
                # the wider of the two dtypes; the engine casts each gradient to its parameter's dtype.
                grad_W = grad_W.to(weight.dtype).to(torch.promote_types(mask.dtype, weight.dtype))
                grad_mask = (grad_W * weight).to(mask.dtype) if needs_mask else None
                grad_weight = (grad_W * mask).to(weight.dtype) if needs_weight else None
            if needs_bias:
                grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_input, grad_mask, grad_weight, grad_bias, None


class MaskedLinear(nn.Module):
    """`y = x @ (mask ⊙ weight)^T + bias`, replacing an `nn.Linear` or a Transformers `Conv1D`.

    `mask` and `weight` have the original weight's shape and layout (Conv1D stores (in, out)), so
    pruning patterns and merging work on the layout users see. The bias is the original Parameter,
    untouched. The replaced module is kept (without its weight) to be restored by `unwrap`, so its
    class, attributes and Accelerate hooks survive a round trip.

    When a graph is built, the forward goes through `_MaskedLinearFn`, which saves only the input, mask
    and weight and recomputes `mask ⊙ weight` in the backward pass: one weight-sized tensor less per
    layer held from forward to backward. Outputs and gradients are those of plain autograd on
    `F.linear(x, mask ⊙ weight, bias)`; set `recompute_product = False` (on the class or on one layer)
    to use plain autograd instead (benchmark baseline, debugging).
    """

    recompute_product: bool = True

    def __init__(self, base: nn.Module, beta: float, mask_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"MaskedLinear wraps nn.Linear or Conv1D, not {type(base).__name__}.")
        W = base.weight
        self.transposed = isinstance(base, Conv1D)  # weight is (in, out)
        self.out_features, self.in_features = (W.shape[1], W.shape[0]) if self.transposed else W.shape
        self.beta = float(beta)
        W32 = W.detach().float()
        mask = _pilot_mask(W32, self.beta).to(dtype=mask_dtype or W.dtype)
        # Solve w0 against the mask as stored: in bf16/fp16 the rounded mask is what the forward
        # multiplies by, and this keeps mask ⊙ weight == W for far more entries than W / m0(fp32).
        weight = _solve_weight(W32, mask.float())
        self.mask = nn.Parameter(mask)
        self.weight = nn.Parameter(weight.to(dtype=W.dtype))
        self.bias = base.bias  # same Parameter object: trainable state and ties are unchanged
        self.weight_requires_grad = W.requires_grad
        # The replaced module, emptied of its dense weight (memory) and kept out of the module tree.
        base._parameters.pop("weight")
        base.register_parameter("weight", None)
        self.__dict__["base_layer"] = base

    def merged_weight(self) -> torch.Tensor:
        """The effective weight mask ⊙ weight, in the weight's dtype and layout.

        The product is taken in the wider of the two dtypes and rounded once, and the forward uses this
        same tensor, so merging never changes the model's outputs (also with mask_dtype != weight dtype).
        """
        return (self.mask * self.weight).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.mask, self.weight, self.bias)
        if self.recompute_product and torch.is_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return _MaskedLinearFn.apply(x, self.mask, self.weight, self.bias, self.transposed)
        # No graph to build (eval, no_grad, the first pass of reentrant checkpointing), or the switch is off:
        # plain autograd, which keeps the product mask ⊙ weight alive until backward.
        W = self.merged_weight()
        return F.linear(x, W.t() if self.transposed else W, self.bias)

    @torch.no_grad()
    def unwrap(self) -> nn.Module:
        """Give back the original module holding the merged weight mask ⊙ weight."""
        base = self.base_layer
        base.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight_requires_grad)
        base.bias = self.bias
        base.train(self.training)  # it sat outside the module tree, so train()/eval() did not reach it
        return base

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return (f"{kind}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}), beta={self.beta:g}")
