import copy

import pytest
import torch

from pilot_hf.optim import TensorwiseAdamW


def _run(opt_cls, steps=5, **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3))]
    opt = opt_cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, **kw)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * (step + 1) + i)
        opt.step()
    return params, opt


def test_entrywise_groups_are_exactly_adamw():
    ours, _ = _run(TensorwiseAdamW, weight_decay=0.1)
    ref, _ = _run(torch.optim.AdamW, weight_decay=0.1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tensorwise_update_is_proportional_to_the_gradient():
    p = torch.nn.Parameter(torch.zeros(4, 5))
    g = torch.linspace(-3, 2, 20).reshape(4, 5)
    g[0, 0] = 30.0  # a heavy-tail outlier
    opt = TensorwiseAdamW([p], lr=0.1, eps=0.0, tensorwise=True)
    p.grad = g.clone()
    opt.step()
    # first step, bias-corrected: update = -lr · g / sqrt(mean g²): one scale for the whole tensor...
    expected = -0.1 * g / g.square().mean().sqrt()
    assert (expected.abs() < 0.1).sum() == 19
    # ... except that no coordinate moves by more than lr (the outlier is capped)
    torch.testing.assert_close(p.detach(), expected.clamp(-0.1, 0.1))
    assert p[0, 0].item() == pytest.approx(-0.1)
    assert opt.state[p]["exp_avg_sq"].dim() == 0  # one number, not a tensor of second moments
    # entrywise Adam would instead move every entry by lr·sign(g)
    q = torch.nn.Parameter(torch.zeros(4, 5))
    ref = torch.optim.AdamW([q], lr=0.1, eps=0.0, weight_decay=0.0)
    q.grad = g.clone()
    ref.step()
    torch.testing.assert_close(q.detach(), -0.1 * g.sign())  # (g has no zero entry)


def test_state_dict_round_trip_continues_identically():
    params, opt = _run(TensorwiseAdamW, steps=3, tensorwise=True)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = TensorwiseAdamW(clone, lr=1e-2, betas=(0.9, 0.99), tensorwise=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as saved to and read from a checkpoint
    for o, ps in ((opt, params), (opt2, clone)):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="betas"):
        TensorwiseAdamW([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))
