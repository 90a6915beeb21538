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
    mask = torch.sqrt((beta + torch.sqrt(beta * beta + 4 * W32 * W32)) / 2)
    weight = torch.where(mask > 0, W32 / mask.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(W32))
    return mask, weight


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
        mask, weight = pilot_init(W, self.beta)
        self.mask = nn.Parameter(mask.to(device=W.device, dtype=mask_dtype or W.dtype))
        self.weight = nn.Parameter(weight.to(device=W.device, dtype=W.dtype))
        self.bias = base.bias  # same Parameter object: trainable state and ties are unchanged
        self.weight_requires_grad = W.requires_grad
        # The replaced module, emptied of its dense weight (memory) and kept out of the module tree.
        base._parameters.pop("weight")
        base.register_parameter("weight", None)
        self.__dict__["base_layer"] = base

    def merged_weight(self) -> torch.Tensor:
        """The effective weight mask ⊙ weight, in the weight's dtype and layout."""
        return (self.mask * self.weight).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.mask.to(self.weight.dtype) * self.weight
        return F.linear(x, W.t() if self.transposed else W, self.bias)

    @torch.no_grad()
    def unwrap(self) -> nn.Module:
        """Give back the original module holding the merged weight mask ⊙ weight."""
        base = self.base_layer
        base.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight_requires_grad)
        base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return (f"{kind}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}), beta={self.beta:g}")
