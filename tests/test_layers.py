"""MaskedLinear and the PILoT initialization (docs/METHOD.md, sections 1-2): exact function at step 0,
mask/weight identities, dtypes, biases, gradients and trainable-parameter bookkeeping."""

import pytest
import torch
import torch.nn.functional as F
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
    golden = torch.sqrt((1 + torch.sqrt(1 + 4 * W * W)) / 2)  # docs/METHOD.md section 2
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
    """∇m = g ⊙ w and ∇w = g ⊙ m with g the dense weight gradient (docs/METHOD.md, section 3)."""
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


# ----- the memory-saving autograd function (_MaskedLinearFn) vs plain autograd --------------------------------


def _plain_forward(layer, x):
    """The plain-autograd formulation the custom function replaces (it keeps mask ⊙ weight for backward)."""
    W = (layer.mask * layer.weight).to(layer.weight.dtype)
    return F.linear(x, W.t() if layer.transposed else W, layer.bias)


def _masked(kind, bias=True, in_features=12, out_features=8, mask_dtype=None):
    layer = MaskedLinear(_linear(kind, in_features, out_features, bias=bias), beta=1.0, mask_dtype=mask_dtype)
    if kind == "conv1d" and not bias:
        layer.bias = None
    with torch.no_grad():  # a trained-like state: mask and weight no longer tied by the initialization
        layer.mask.mul_(1 + 0.3 * torch.randn_like(layer.mask))
    return layer


def _grads(layer, x, forward, autocast=False):
    for t in (x, *layer.parameters()):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = forward(layer, x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))  # a non-uniform upstream gradient
    (y.float() * probe).sum().backward()
    return y.detach(), {n: t.grad for n, t in (("input", x), ("mask", layer.mask), ("weight", layer.weight),
                                                ("bias", layer.bias)) if t is not None}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)])
@pytest.mark.parametrize("frozen", [(), ("input",), ("weight",), ("mask", "weight"), ("input", "mask", "bias")])
def test_recomputing_function_matches_plain_autograd(kind, bias, shape, frozen):
    layer = _masked(kind, bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x.requires_grad_("input" not in frozen)
    for name in ("mask", "weight", "bias"):
        if name in frozen and getattr(layer, name) is not None:
            getattr(layer, name).requires_grad_(False)
    y, grads = _grads(layer, x, MaskedLinear.forward)
    assert type(layer(x).grad_fn).__name__ == "_MaskedLinearFnBackward"  # the recomputing path is taken
    y_ref, grads_ref = _grads(layer, x, _plain_forward)
    assert torch.equal(y, y_ref)  # bit-identical outputs
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        if g is None or grads_ref[name] is None:
            assert g is None and grads_ref[name] is None, name
            continue
        assert g.dtype == grads_ref[name].dtype and g.shape == grads_ref[name].shape, name
        assert torch.allclose(g, grads_ref[name], rtol=1e-5, atol=1e-6), name
    with torch.no_grad():  # no graph: the plain path, same output
        assert torch.equal(layer(x), y_ref)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mask_dtype", [None, "bfloat16"])
def test_recomputing_function_under_bf16_autocast(kind, mask_dtype):
    """CPU bf16 autocast (the same code path as CUDA bf16/fp16): the backward matmuls run in the dtype the
    forward used, and every gradient comes back in its tensor's dtype."""
    layer = _masked(kind, in_features=48, out_features=32, mask_dtype=getattr(torch, mask_dtype or "float32"))
    x = torch.randn(4, 6, 48, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y, grads = _grads(layer, x, MaskedLinear.forward, autocast=True)
    y_ref, grads_ref = _grads(layer, x, _plain_forward, autocast=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    for name, g in grads.items():
        ref = grads_ref[name]
        assert g.dtype == ref.dtype == (x if name == "input" else getattr(layer, name)).dtype, name
        assert (g.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max(), name  # bf16 rounding


def _saved_tensors(layer, x, autocast=False):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x).sum().backward()
    params = {p.data_ptr() for p in layer.parameters()}
    return [t for t in saved if t.data_ptr() not in params]  # parameters are referenced, not copied


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("autocast", [False, True])
def test_recomputing_function_saves_no_weight_sized_tensor(kind, autocast):
    layer = _masked(kind, in_features=256, out_features=384)
    x = torch.randn(2, 3, 256, requires_grad=True)  # 1.5k activations vs a 98k-entry weight
    saved = _saved_tensors(layer, x, autocast)
    assert sum(t.numel() for t in saved) <= x.numel()  # only the input (or its autocast copy) is kept
    # The plain formulation keeps the product mask ⊙ weight (or its autocast copy): the check sees it.
    layer.recompute_product = False
    saved = _saved_tensors(layer, x, autocast)
    assert any(t.numel() == layer.weight.numel() for t in saved)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_recomputing_function_with_gradient_checkpointing(arch, reentrant):
    def grads(checkpointing, recompute):
        model = tiny_model(arch)
        wrap_model(model)
        for layer in masked_layers(model).values():
            layer.recompute_product = recompute
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        x = tiny_inputs()
        model(x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    got, ref = grads(True, True), grads(False, False)
    assert got.keys() == ref.keys() and any(n.endswith(".mask") for n in got)
    for name, g in got.items():
        assert torch.allclose(g, ref[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_recomputing_function_compiles_in_one_graph(kind):
    layer = _masked(kind)
    x = torch.randn(3, 5, 12, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y, grads = _grads(layer, x, lambda _, inp: compiled(inp))
    y_ref, grads_ref = _grads(layer, x, _plain_forward)
    assert torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], rtol=1e-5, atol=1e-6), name
