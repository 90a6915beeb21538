"""Exact sparsity patterns (docs/METHOD.md, section 6): counts, deterministic tie-breaking, N:M groups along the
input dimension (also for GPT-2's transposed Conv1D), global budgets, reports, and bad input."""

import json

import pytest
import torch
import transformers as T
from conftest import ARCHITECTURES, tiny_inputs, tiny_model
from transformers.pytorch_utils import Conv1D

from pilot_hf import (
    PILoTConfig,
    SparsityPattern,
    find_target_layers,
    keep_mask,
    keep_masks,
    magnitude_prune,
    masked_layers,
    merge_and_unload,
    prune_model,
    sparsity_report,
    wrap_model,
)

NM_PATTERNS = ["2:4", "4:8", "1:3"]


# --- helpers (independent of the code under test) ---------------------------------------------------------


def wide_model(arch, seed=0):
    """Tiny models whose every in_features is divisible by 3, 4 and 8 (for 1:3, 2:4, 4:8)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = T.GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                              bos_token_id=0, eos_token_id=0)
    else:
        config = T.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    return T.AutoModelForCausalLM.from_config(config).eval()


def quantize_targets(model, levels=4, step=0.01, seed=0):
    """Give every target weight values in {±step, ±2·step, ...}: many exact magnitude ties, no zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in find_target_layers(model).values():
            shape = module.weight.shape
            sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
            module.weight.copy_(sign * torch.randint(1, levels + 1, shape, generator=g) * step)
    return model


def effective(module):
    """The weight the layer computes with, in (out_features, in_features) layout."""
    W = module.merged_weight() if hasattr(module, "merged_weight") else module.weight
    transposed = getattr(module, "transposed", isinstance(module, Conv1D))
    return (W.t() if transposed else W).detach()


def groups(t, pattern):
    """(num_groups, group_size) view of an (out, in) tensor: one group per layer, row, or N:M block."""
    p = SparsityPattern.parse(pattern)
    if p.is_nm:
        return t.reshape(-1, p.m)
    return t.reshape(t.shape[0], -1) if p.kind == "row" else t.reshape(1, -1)


def expected_pruned(scores, k):
    """Indices of the k lowest scores, earliest index first among equal scores (plain Python sort)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return set(order[:k])


def n_pruned(pattern, group_size, sparsity):
    p = SparsityPattern.parse(pattern)
    return p.m - p.n if p.is_nm else round(sparsity * group_size)


def check_layer(scores, pruned, pattern, sparsity):
    """Exact count in every group, and exactly the lowest scores pruned with the tie rule."""
    s, z = groups(scores, pattern), groups(pruned, pattern)
    k = n_pruned(pattern, s.shape[1], sparsity)
    assert torch.all(z.sum(dim=1) == k), (pattern, z.sum(dim=1).unique())
    for row_scores, row_pruned in zip(s.tolist(), z.tolist()):
        got = {i for i, flag in enumerate(row_pruned) if flag}
        assert got == expected_pruned(row_scores, k)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_untouched(model, snap):
    state, types = snapshot(model)
    assert types == snap[1] and state.keys() == snap[0].keys()
    for key, value in state.items():
        assert torch.equal(value, snap[0][key]), key


# --- keep_mask / keep_masks on constructed scores ---------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "row", "2:4", "4:8", "1:3"])
@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["random", "ties", "all-equal"])
def test_keep_mask_counts_and_tie_rule(pattern, sparsity, kind):
    g = torch.Generator().manual_seed(3)
    shape = (10, 24)  # 24 is divisible by 3, 4 and 8; 0.37 · 24 and 0.37 · 240 are not integers
    scores = {"random": torch.rand(shape, generator=g),
              "ties": torch.randint(0, 3, shape, generator=g).float(),
              "all-equal": torch.ones(shape)}[kind]
    nm = SparsityPattern.parse(pattern).is_nm
    keep = keep_mask(scores, None if nm else sparsity, pattern)
    assert keep.dtype == torch.bool and keep.shape == shape
    check_layer(scores, ~keep, pattern, sparsity)
    assert torch.equal(keep, keep_mask(scores.clone(), None if nm else sparsity, pattern))  # deterministic
    if kind == "all-equal":  # earliest index pruned first: the leading entries of each group
        z = groups(~keep, pattern)
        k = n_pruned(pattern, z.shape[1], sparsity)
        assert z[:, :k].all() and not z[:, k:].any()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.73])
def test_global_budget_is_exact_and_ties_go_to_the_earliest_layer(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 4, (6, 8), generator=g).float(),
              "b": torch.randint(0, 4, (5, 12), generator=g).float(),
              "c": torch.randint(0, 4, (3, 4), generator=g).float()}
    total = sum(s.numel() for s in scores.values())
    keep = keep_masks(scores, sparsity, "global")
    k = round(sparsity * total)
    assert sum(int((~m).sum()) for m in keep.values()) == k
    flat = [(v, layer, i) for layer, s in enumerate(scores.values()) for i, v in enumerate(s.flatten().tolist())]
    expected = set(sorted(flat)[:k])  # lowest score, then earliest layer, then earliest index
    got = {(v, layer, i) for layer, (name, s) in enumerate(scores.items())
           for i, v in enumerate(s.flatten().tolist()) if not keep[name].flatten()[i]}
    assert got == expected
    # Per-layer budgets differ from the uniform ones (otherwise 'global' would test nothing).
    assert any(int((~m).sum()) != round(sparsity * m.numel()) for m in keep.values())


def test_nm_pattern_implies_its_sparsity():
    scores = torch.rand(4, 8)
    assert torch.equal(keep_mask(scores, 0.5, "2:4"), keep_mask(scores, None, "2:4"))
    with pytest.raises(ValueError, match=r"always gives sparsity 0.666667.*sparsity=None"):
        keep_mask(torch.rand(4, 9), 0.5, "1:3")


@pytest.mark.parametrize("spec,parsed", [("2:4", (2, 4)), (" 4:8 ", (4, 8)), ("1:3", (1, 3)),
                                         ("UNSTRUCTURED", "unstructured"), ("row", "row"), ("global", "global")])
def test_pattern_parsing(spec, parsed):
    p = SparsityPattern.parse(spec)
    assert ((p.n, p.m) if p.is_nm else p.kind) == parsed
    assert SparsityPattern.parse(str(p)) == p


# --- prune_model (wrapped) and magnitude_prune (dense) on every architecture ------------------------------


def targets(model, wrapped):
    """Wrap (or not) and return the layers that will be pruned."""
    if wrapped:
        wrap_model(model)
        return masked_layers(model)
    return find_target_layers(model)


def prune(model, wrapped, sparsity, pattern):
    """(keep-masks, layers) after pruning a wrapped model with prune_model or a dense one with magnitude_prune.
    Call targets() first to look at the scores the pruning sees."""
    if wrapped:
        if not masked_layers(model):
            wrap_model(model)
        return prune_model(model, sparsity, pattern), masked_layers(model)
    return magnitude_prune(model, sparsity, pattern), find_target_layers(model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pattern", ["unstructured", "row", "2:4", "4:8"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
def test_pruning_is_exact_on_every_architecture(arch, pattern, wrapped):
    model = quantize_targets(tiny_model(arch)) if pattern in ("unstructured", "row") else tiny_model(arch)
    # The scores pruning sees: |W|, or |m ⊙ w| once wrapped (equal to W up to fp32 rounding).
    before = {n: effective(m).clone() for n, m in targets(model, wrapped).items()}
    nm = SparsityPattern.parse(pattern).is_nm
    keep, layers = prune(model, wrapped, None if nm else 0.5, pattern)
    assert keep.keys() == layers.keys() == before.keys()
    for name, layer in layers.items():
        W = effective(layer)
        pruned = W == 0
        check_layer(before[name].abs(), pruned, pattern, 0.5)
        assert torch.equal(W[~pruned], before[name][~pruned])  # kept weights unchanged
        # The returned keep-mask is in the layer's own layout and says exactly what was zeroed.
        own = layer.weight
        assert keep[name].shape == own.shape and keep[name].dtype == torch.bool
        raw = (layer.merged_weight() if wrapped else layer.weight) != 0
        assert torch.equal(keep[name], raw)
        if wrapped:  # both factors are zeroed, so training cannot regrow a pruned weight by itself
            assert torch.equal(layer.mask == 0, ~keep[name]) and torch.equal(layer.weight == 0, ~keep[name])


@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
@pytest.mark.parametrize("pattern", ["unstructured", "row", "2:4", "global"])
def test_many_exact_ties_are_broken_deterministically(wrapped, pattern):
    """Weights with 2 magnitude levels: nearly every cut falls inside a tie; two runs give the same zeros."""
    results = []
    for _ in range(2):
        model = quantize_targets(tiny_model("llama"), levels=2)
        before = {n: effective(m).clone() for n, m in targets(model, wrapped).items()}
        _, layers = prune(model, wrapped, None if pattern == "2:4" else 0.5, pattern)
        results.append({n: effective(m) == 0 for n, m in layers.items()})
        if pattern != "global":
            for name in layers:
                check_layer(before[name].abs(), results[-1][name], pattern, 0.5)
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    if pattern == "global":
        total = sum(z.numel() for z in results[0].values())
        assert sum(int(z.sum()) for z in results[0].values()) == round(0.5 * total)
        flat = [(v, li, i) for li, b in enumerate(before.values()) for i, v in enumerate(b.abs().flatten().tolist())]
        expected = set(sorted(flat)[:round(0.5 * total)])
        got = {(v, li, i) for li, (n, b) in enumerate(before.items())
               for i, v in enumerate(b.abs().flatten().tolist()) if results[0][n].flatten()[i]}
        assert got == expected


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pattern", NM_PATTERNS)
@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
def test_nm_groups_run_along_the_input_dimension(arch, pattern, wrapped):
    model = wide_model(arch)
    x = tiny_inputs(length=8)
    _, layers = prune(model, wrapped, None, pattern)
    n, m = map(int, pattern.split(":"))
    across_outputs_violated = False
    for name, layer in layers.items():
        raw = (layer.merged_weight() if wrapped else layer.weight).detach()
        conv = isinstance(layer, Conv1D) or getattr(layer, "transposed", False)
        assert conv == (arch == "gpt2")
        # Conv1D stores (in, out): the input dimension is dim 0. nn.Linear stores (out, in): dim 1.
        along_input = raw.t() if conv else raw  # (out, in)
        nonzero = (along_input != 0).reshape(along_input.shape[0], -1, m).sum(dim=2)
        assert torch.all(nonzero <= n), name
        assert torch.all(nonzero == n), name  # no weight was zero before: exactly N kept per group
        # Grouping along the output dimension instead would not satisfy N:M (the test can tell them apart).
        other = along_input.t()
        if other.shape[1] % m == 0:
            across = (other != 0).reshape(other.shape[0], -1, m).sum(dim=2)
            across_outputs_violated |= bool((across > n).any())
    assert across_outputs_violated
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_global_hits_the_total_exactly(wrapped, sparsity):
    model = tiny_model("gpt2")
    _, layers = prune(model, wrapped, sparsity, "global")
    zeros = sum(int((effective(m) == 0).sum()) for m in layers.values())
    total = sum(effective(m).numel() for m in layers.values())
    assert zeros == round(sparsity * total)
    per_layer = [float((effective(m) == 0).float().mean()) for m in layers.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # really global: layers end up with different sparsities


def test_pruning_again_is_nested_and_exact():
    model = tiny_model("llama")
    wrap_model(model)
    first = prune_model(model, 0.5)
    second = prune_model(model, 0.5)
    assert all(torch.equal(first[n], second[n]) for n in first)  # the zeros are the lowest scores already
    third = prune_model(model, 0.75)
    for name, layer in masked_layers(model).items():
        assert int((~third[name]).sum()) == round(0.75 * layer.weight.numel())
        assert not (third[name] & ~first[name]).any()  # nothing pruned comes back


def test_magnitude_prune_uses_given_scores_also_when_wrapped():
    for wrapped in (False, True):
        model = tiny_model("gpt2")
        g = torch.Generator().manual_seed(5)
        scores = {n: torch.rand(tuple(effective(m).shape), generator=g) for n, m in find_target_layers(model).items()}
        if wrapped:
            wrap_model(model)
        keep = magnitude_prune(model, 0.5, "row", scores=scores)
        layers = masked_layers(model) if wrapped else find_target_layers(model)
        for name, layer in layers.items():
            check_layer(scores[name], effective(layer) == 0, "row", 0.5)
            assert torch.equal(keep[name].t(), ~(effective(layer) == 0))  # Conv1D: keep is (in, out)


def test_pruned_model_after_merge_keeps_logits_and_zeros():
    model = tiny_model("opt")
    x = tiny_inputs()
    wrap_model(model)
    prune_model(model, 0.5)
    with torch.no_grad():
        pruned = model(x).logits
    zeros = {n: effective(m) == 0 for n, m in masked_layers(model).items()}
    merge_and_unload(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, pruned)
    for name, module in find_target_layers(model).items():
        assert torch.equal(effective(module) == 0, zeros[name])


# --- sparsity_report --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_sparsity_report_is_json_and_exact(arch):
    model = tiny_model(arch)
    wrap_model(model)
    dense_report = sparsity_report(model)
    assert dense_report["total"]["zeros"] == 0
    prune_model(model, 0.3, "global")
    report = sparsity_report(model)
    assert json.loads(json.dumps(report)) == report
    layers = masked_layers(model)
    assert set(report["layers"]) == set(layers)
    for name, layer in layers.items():
        W = layer.merged_weight()
        entry = report["layers"][name]
        assert entry == {"shape": list(W.shape), "numel": W.numel(), "zeros": int((W == 0).sum()),
                         "sparsity": int((W == 0).sum()) / W.numel()}
    total = sum(m.weight.numel() for m in layers.values())
    assert report["total"] == {"numel": total, "zeros": round(0.3 * total), "sparsity": round(0.3 * total) / total}
    merge_and_unload(model)
    assert sparsity_report(model) == report  # counted the same on the plain model


def test_sparsity_report_of_dense_custom_targets():
    model = tiny_model("llama")
    config = PILoTConfig(target_modules=["q_proj"])
    magnitude_prune(model, 0.25, config=config)
    report = sparsity_report(model, config)
    assert set(report["layers"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert report["total"]["zeros"] == 2 * round(0.25 * 32 * 32)
    assert sparsity_report(model)["total"]["zeros"] == report["total"]["zeros"]  # default targets include q_proj
    v_proj = model.model.layers[0].self_attn.v_proj.weight
    assert int((v_proj == 0).sum()) == 0  # not targeted, not pruned


# --- bad input: clear ValueError, model untouched ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prune_model_on_unwrapped_model_raises(arch):
    model = tiny_model(arch)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"no masked layers; call wrap_model\(model\) first.*magnitude_prune"):
        prune_model(model, 0.5)
    assert_untouched(model, snap)


@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5, True, float("nan"), "0.5"])
@pytest.mark.parametrize("pattern", ["unstructured", "row", "global"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
def test_sparsity_outside_open_interval_raises(sparsity, pattern, wrapped):
    model = tiny_model("gpt2")
    if wrapped:
        wrap_model(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        (prune_model if wrapped else magnitude_prune)(model, sparsity, pattern)
    assert_untouched(model, snap)


@pytest.mark.parametrize("pattern,message", [
    ("4:4", r"needs 0 < N < M"), ("5:4", r"needs 0 < N < M"), ("0:4", r"needs 0 < N < M"),
    ("2:4:8", "not known"), ("half", "not known"), ("-1:4", "not known"),
])
@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
def test_bad_patterns_raise(pattern, message, wrapped):
    model = tiny_model("llama")
    if wrapped:
        wrap_model(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        (prune_model if wrapped else magnitude_prune)(model, None, pattern)
    assert_untouched(model, snap)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
def test_nm_with_indivisible_in_features_raises(arch, wrapped):
    model = tiny_model(arch)  # in_features 32 (and 64/128): not divisible by 3
    if wrapped:
        wrap_model(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"pattern 1:3 needs in_features divisible by 3, but .* has in_features=32"):
        (prune_model if wrapped else magnitude_prune)(model, None, "1:3")
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match="always gives sparsity 0.5"):
        (prune_model if wrapped else magnitude_prune)(model, 0.3, "2:4")
    assert_untouched(model, snap)


def test_scores_that_do_not_fit_the_targets_raise():
    model = tiny_model("gpt2")
    snap = snapshot(model)
    scores = {n: effective(m).abs() for n, m in find_target_layers(model).items()}
    missing = dict(list(scores.items())[1:])
    with pytest.raises(ValueError, match="one entry per target layer; missing"):
        magnitude_prune(model, 0.5, scores=missing)
    name = next(iter(scores))
    wrong = {**scores, name: scores[name].t()}  # Conv1D layout instead of (out, in)
    with pytest.raises(ValueError, match=r"must be \(96, 32\) \(out_features, in_features\)"):
        magnitude_prune(model, 0.5, scores=wrong)
    assert_untouched(model, snap)


def test_keep_mask_rejects_bad_input_directly():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        keep_mask(torch.rand(4, 4), 1.0, "unstructured")
    with pytest.raises(ValueError, match="divisible by 8"):
        keep_masks({"x": torch.rand(4, 12)}, None, "4:8")
    with pytest.raises(ValueError, match="must be 2-D"):
        keep_mask(torch.rand(4, 4, 4), 0.5, "unstructured")


@pytest.mark.parametrize("wrapped", [True, False], ids=["prune_model", "magnitude_prune"])
def test_nan_weights_are_refused_before_anything_is_pruned(wrapped):
    model = tiny_model("llama")
    layers = targets(model, wrapped)
    with torch.no_grad():
        last = list(layers.values())[-1]
        last.weight[0, 0] = float("nan")  # a diverged weight in the last layer
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj contain NaN"):
        magnitude_prune(model, 0.5)
    state, _ = snapshot(model)
    for key, value in state.items():  # equal_nan: the NaN itself is still there
        assert torch.allclose(value, snap[0][key], rtol=0, atol=0, equal_nan=True), key


@pytest.mark.parametrize("pattern,expected", [("unstructured", 0.5), ("1:4", 0.75), ("2:4", 0.5)])
def test_default_sparsity_is_half_or_the_n_m_ratio(pattern, expected):
    model = tiny_model("llama")
    magnitude_prune(model, pattern=pattern)
    assert sparsity_report(model)["total"]["sparsity"] == pytest.approx(expected, abs=1e-3)


def test_pruned_zeros_are_positive_zeros():
    model = tiny_model("llama")
    wrap_model(model)
    prune_model(model, 0.5)
    for layer in masked_layers(model).values():
        for p in (layer.mask, layer.weight):
            zeros = p[p == 0]
            assert not torch.signbit(zeros).any()
