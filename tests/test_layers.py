"""MaskedLinear and the PILoT initialization (METHOD.md, sections 1-2): exact function at step 0,
mask/weight identities, dtypes, biases, gradients and trainable-parameter bookkeeping."""

import pytest
import torch
from conftest import ARCHITECTURES, tiny_inputs, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from pilot_hf import MaskedLinear, PILoTConfig, masked_layers, merge_and_unload, pilot_init, wrap_model
from pilot_hf.wrapping import find_target_layers

EPS32 = torch.finfo(torch.float32).eps


def _weights(shape=(64, 48), std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * std
    W[0, :5] = torch.tensor([0.0, 1e-30, -1e-30, 3.0, -3.0])  # zero, tiny and large entries
    return W


@pytest.mark.parametrize("beta", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("std", [0.01, 0.1, 2.0])
def test_pilot_init_solves_product_and_balance(beta, std):
    W = _weights(std=std)
    m, w = pilot_init(W, beta)
    assert m.dtype == w.dtype == torch.float32 and m.shape == w.shape == W.shape
    # m ⊙ w = W to fp32 rounding (w = W / m costs at most ~1 ulp, the product another).
    assert torch.all((m * w - W).abs() <= 2 * EPS32 * W.abs())
    # m² − w² = β, relative to the size of the terms that are subtracted.
    assert torch.all(((m * m - w * w) - beta).abs() <= 8 * EPS32 * (m * m + w * w))
    assert torch.all(m >= beta ** 0.5)  # m² = β + w² ≥ β: the mask never reaches 0, so x can flip sign
    assert torch.equal(torch.sign(w), torch.sign(W))


def test_pilot_init_closed_form_values():
    W = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
    m, w = pilot_init(W, 1.0)
    golden = torch.sqrt((1 + torch.sqrt(1 + 4 * W * W)) / 2)  # METHOD.md section 2
    assert torch.allclose(m, golden, rtol=0, atol=1e-7)
    assert torch.allclose(w, W / golden, rtol=0, atol=1e-7)
    assert m[0, 0] == 1.0 and w[0, 0] == 0.0  # W = 0: m = sqrt(β), w = 0


def test_spred_init_is_balanced_sqrt():
    W = _weights(std=0.3)
    m, w = pilot_init(W, 0.0)
    assert torch.allclose(m, W.abs().sqrt(), rtol=1e-6, atol=0)
    assert torch.allclose(w, torch.sign(W) * W.abs().sqrt(), rtol=1e-6, atol=0)
    assert torch.all((m * m - w * w).abs() <= 4 * EPS32 * W.abs())  # β = 0
    assert m[0, 0] == 0 and w[0, 0] == 0  # W = 0 gives m = w = 0, no NaN
    assert torch.isfinite(w).all()
    assert torch.all((m * w - W).abs() <= 2 * EPS32 * W.abs())


def test_spred_config_forces_beta_zero():
    assert PILoTConfig(init="spred", beta=3.0).beta == 0.0
    with pytest.raises(ValueError, match="spred"):
        PILoTConfig(beta=0.0)


def _linear(kind, in_features=12, out_features=8, bias=True):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias)
    layer = Conv1D(out_features, in_features)  # weight (in, out)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_masked_linear_matches_base_and_keeps_layout(kind):
    base = _linear(kind)
    x = torch.randn(3, 5, 12)
    dense_out = base(x)
    W, bias = base.weight.detach().clone(), base.bias
    layer = MaskedLinear(base, beta=1.0)
    assert layer.mask.shape == layer.weight.shape == W.shape  # Conv1D keeps its (in, out) layout
    assert (layer.in_features, layer.out_features) == (12, 8)
    assert layer.transposed == (kind == "conv1d")
    assert layer.bias is bias
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "mask", "weight"]
    assert (layer(x) - dense_out).abs().max() <= 1e-6
    assert torch.allclose(layer.merged_weight(), W, rtol=2 * EPS32, atol=0)

    unwrapped = layer.unwrap()
    assert type(unwrapped) is type(base) and unwrapped is base
    assert unwrapped.bias is bias
    assert torch.equal(unwrapped.weight, layer.merged_weight())
    assert torch.equal(unwrapped(x), layer(x))


def test_masked_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or Conv1D"):
        MaskedLinear(nn.Embedding(4, 4), beta=1.0)


def test_unwrap_follows_train_eval_mode():
    layer = MaskedLinear(_linear("linear"), beta=1.0)
    layer.train()
    assert layer.unwrap().training
    layer = MaskedLinear(_linear("linear").train(), beta=1.0)
    layer.eval()
    assert not layer.unwrap().training


def test_gradients_are_chain_rule_of_dense_gradient():
    """∇m = g ⊙ w and ∇w = g ⊙ m with g the dense weight gradient (METHOD.md, section 3)."""
    dense = _linear("conv1d")
    x = torch.randn(4, 12)
    target = torch.randn(4, 8)
    ((dense(x) - target) ** 2).sum().backward()
    g = dense.weight.grad.clone()
    layer = MaskedLinear(_linear("conv1d"), beta=1.0)
    ((layer(x) - target) ** 2).sum().backward()
    assert torch.allclose(layer.mask.grad, g * layer.weight.detach(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(layer.weight.grad, g * layer.mask.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [None, "float32", "bfloat16"])
def test_half_precision_models_wrap(arch, dtype, mask_dtype):
    model = tiny_model(arch, dtype=dtype)
    with torch.no_grad():  # pretrained-like magnitudes (~0.1): masks then differ from 1 in half precision
        for module in find_target_layers(model).values():
            module.weight.mul_(5)
    x = tiny_inputs()
    targets = {n: m.weight.detach().clone() for n, m in find_target_layers(model).items()}
    with torch.no_grad():
        before = model(x).logits.float()
    wrap_model(model, PILoTConfig(mask_dtype=mask_dtype))
    expected_mask_dtype = dtype if mask_dtype is None else getattr(torch, mask_dtype)
    layers = masked_layers(model)
    assert layers.keys() == targets.keys()
    mismatched = 0
    for name, layer in layers.items():
        assert layer.mask.dtype == expected_mask_dtype
        assert layer.weight.dtype == dtype
        merged = layer.merged_weight()
        assert merged.dtype == dtype
        # Effective weight within one rounding of the original (relative half-precision ulp).
        ulp = torch.finfo(dtype).eps
        assert torch.all((merged.float() - targets[name].float()).abs() <= 2 * ulp * targets[name].float().abs())
        mismatched += int((merged != targets[name]).sum())
    total = sum(t.numel() for t in targets.values())
    # Solving w0 against the stored (rounded) mask reproduces almost every weight bit-exactly
    # (measured <= 0.4% here; W / m0(fp32) then rounded missed 23-30%).
    assert mismatched <= 0.01 * total, (mismatched, total)
    with torch.no_grad():
        wrapped = model(x).logits.float()
    assert (wrapped - before).abs().max() <= 0.02 * before.abs().max()
    assert torch.isfinite(wrapped).all()
    # Merging gives back exactly the function the wrapped model computes, whatever the mask dtype.
    merge_and_unload(model)
    with torch.no_grad():
        merged = model(x).logits.float()
    assert torch.equal(merged, wrapped)
    for module in find_target_layers(model).values():
        assert type(module) is (Conv1D if arch == "gpt2" else nn.Linear) and module.weight.dtype == dtype


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_reach_mask_and_weight_of_every_target(arch):
    model = tiny_model(arch)
    target_weights = {f"{n}.weight" for n in find_target_layers(model)}
    before = _trainable(model) - target_weights
    wrap_model(model)
    after = _trainable(model)
    layers = masked_layers(model)
    new = {f"{n}.{p}" for n in layers for p in ("mask", "weight")}
    assert after - new == before  # nothing else became (or stopped being) trainable
    model.train()
    x = tiny_inputs()
    model(x, labels=x).loss.backward()
    for name, layer in layers.items():
        for p in (layer.mask, layer.weight):
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_model_only_masks_and_weights_become_trainable(arch):
    model = tiny_model(arch)
    model.requires_grad_(False)
    wrap_model(model)
    layers = masked_layers(model)
    assert _trainable(model) == {f"{n}.{p}" for n in layers for p in ("mask", "weight")}
    x = tiny_inputs()
    model(x, labels=x).loss.backward()
    for name, layer in layers.items():
        assert layer.mask.grad is not None and layer.mask.grad.abs().sum() > 0, name
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
        assert layer.bias is None or layer.bias.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # Unwrapping restores the frozen state of the merged weights.
    merge_and_unload(model)
    assert _trainable(model) == set()
