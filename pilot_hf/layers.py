"""The masked layer: a linear layer whose weight is the product `mask ⊙ weight` (METHOD.md, section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def pilot_init(W: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve m ⊙ w = W and m² − w² = β elementwise, in fp32 (METHOD.md, section 2).

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


class MaskedLinear(nn.Module):
    """`y = x @ (mask ⊙ weight)^T + bias`, replacing an `nn.Linear` or a Transformers `Conv1D`.

    `mask` and `weight` have the original weight's shape and layout (Conv1D stores (in, out)), so
    pruning patterns and merging work on the layout users see. The bias is the original Parameter,
    untouched. The replaced module is kept (without its weight) to be restored by `unwrap`, so its
    class, attributes and Accelerate hooks survive a round trip.
    """

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
