"""Numeric invariants that hold at every entry point: "no sparsity given" resolves alike everywhere (one
rule, in pruning.py), and every pruned entry is +0.0."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from helpers import REPO, make_trainer, package_modules

from pilot_hf import methods
from pilot_hf.oneshot import METHODS as ONESHOT_CONFIGS
from pilot_hf.oneshot import OneShotArguments, oneshot_prune
from pilot_hf.pruning import DEFAULT_SPARSITY, SparsityPattern, apply_keep_mask
from pilot_hf.sweep import cell_arguments, parse_cell_sparsity
from pilot_hf.training_args import PILoTTrainingArguments
from pilot_hf.wrapping import magnitude_prune, masked_layers, merge_and_unload, prune_model, wrap_model

MODULES = package_modules()


# ----- one rule, one place: the sparsity default --------------------------------------------------------

def _sparsity_defaults(path: Path) -> list[str]:
    """Fallbacks for a missing sparsity: DEFAULT_SPARSITY-like names, `sparsity=<number>` defaults of
    parameters and dataclass fields, `sparsity = <number>`, `x or <number>` / `<number> if x is None else x`
    on a sparsity. (A dict of explicit preset values, like the CLI's demo settings, is not a fallback.)"""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = str(path.relative_to(REPO))
    found = []

    def is_number(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool) and 0 < node.value < 1

    def mentions_sparsity(node):
        return any((isinstance(n, ast.Name) and "sparsity" in n.id.lower())
                   or (isinstance(n, ast.Attribute) and "sparsity" in n.attr.lower()) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
                     for t in targets]
            value = node.value
            if any("default" in n.lower() and "sparsity" in n.lower() for n in names):
                found.append(f"{where}:{node.lineno}: {names} names a sparsity default")
            if value is not None and any("sparsity" in n.lower() for n in names):
                if is_number(value):
                    found.append(f"{where}:{node.lineno}: {names} = {value.value}")
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
                    for kw in value.keywords:
                        if kw.arg == "default" and is_number(kw.value):
                            found.append(f"{where}:{node.lineno}: field {names} defaults to {kw.value.value}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if "sparsity" in arg.arg.lower() and is_number(default):
                    found.append(f"{where}:{node.lineno}: parameter {arg.arg}={default.value}")
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            if any(is_number(v) for v in node.values) and any(mentions_sparsity(v) for v in node.values):
                found.append(f"{where}:{node.lineno}: `sparsity or <number>`")
        elif isinstance(node, ast.IfExp):
            if (is_number(node.body) or is_number(node.orelse)) and mentions_sparsity(node.test) \
                    and any(isinstance(n, ast.Constant) and n.value is None for n in ast.walk(node.test)):
                found.append(f"{where}:{node.lineno}: `<number> if sparsity is None else ...`")
    return found


def test_the_sparsity_default_lives_only_in_pruning():
    found = {name: _sparsity_defaults(path) for name, path in MODULES.items()}
    assert found.pop("pilot_hf.pruning"), "the scan must find DEFAULT_SPARSITY in pruning.py"
    assert not [f for fs in found.values() for f in fs], "\n".join(f for fs in found.values() for f in fs)
    assert DEFAULT_SPARSITY == 0.5
    # the one rule
    assert SparsityPattern.parse("unstructured").resolve_sparsity(None) == 0.5
    assert SparsityPattern.parse("2:4").resolve_sparsity(None) == 0.5
    assert SparsityPattern.parse("1:4").resolve_sparsity(None) == 0.75
    with pytest.raises(ValueError, match="1:4"):
        SparsityPattern.parse("1:4").resolve_sparsity(0.5)


def _targets_of(model):
    from pilot_hf.wrapping import find_target_layers

    return find_target_layers(model)


def _zero_fractions(model) -> dict[str, float]:
    from pilot_hf.wrapping import effective_weight

    layers = masked_layers(model) or _targets_of(model)
    return {n: float((effective_weight(m) == 0).float().mean()) for n, m in layers.items()}


def _wrapped():
    return wrap_model(tiny_model())


PRUNERS = {
    "prune_model": lambda model, sparsity, pattern: prune_model(model, sparsity, pattern),
    "magnitude_prune": lambda model, sparsity, pattern: magnitude_prune(model, sparsity, pattern),
    "oneshot_prune": lambda model, sparsity, pattern: oneshot_prune(model, None, "magnitude", sparsity, pattern),
}


@pytest.mark.parametrize("entry", sorted(PRUNERS))
@pytest.mark.parametrize("sparsity, pattern, expected", [(None, "unstructured", 0.5), (None, "2:4", 0.5),
                                                         (None, "1:4", 0.75), (0.25, "unstructured", 0.25)])
def test_pruning_entry_points_resolve_the_sparsity_alike(entry, sparsity, pattern, expected):
    model = _wrapped() if entry == "prune_model" else tiny_model()
    PRUNERS[entry](model, sparsity, pattern)
    fractions = _zero_fractions(model)
    assert fractions and all(f == expected for f in fractions.values()), fractions


@pytest.mark.parametrize("entry", sorted(PRUNERS))
def test_pruning_entry_points_refuse_a_sparsity_the_pattern_contradicts(entry):
    model = _wrapped() if entry == "prune_model" else tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="1:4"):
        PRUNERS[entry](model, 0.5, "1:4")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing may be pruned before the check"


def test_argument_classes_and_the_sweep_resolve_the_sparsity_alike(tmp_path):
    def training(**kw):
        return PILoTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)

    for make in (training, OneShotArguments):
        assert make().sparsity == 0.5
        assert make(sparsity_pattern="2:4").sparsity == 0.5
        assert make(sparsity_pattern="1:4").sparsity == 0.75
        assert make(sparsity=0.75, sparsity_pattern="1:4").sparsity == 0.75
        with pytest.raises(ValueError, match="1:4"):
            make(sparsity=0.5, sparsity_pattern="1:4")
    # the sweep names a cell by a fraction or an N:M pattern, never by both
    assert parse_cell_sparsity("0.5") == (0.5, "unstructured")
    assert parse_cell_sparsity("2:4") == (0.5, "2:4")
    assert parse_cell_sparsity("1:4") == (0.75, "1:4")
    for bad in ("0", "1", "1.5", "none", "4:4", "global"):
        with pytest.raises(ValueError):
            parse_cell_sparsity(bad)
    cell = cell_arguments(training(), methods.MethodSpec.parse("pilot"), "1:4", str(tmp_path / "cell"))
    assert (cell.sparsity, cell.sparsity_pattern) == (0.75, "1:4")


# ----- one rule, one place: pruned entries are +0.0 ------------------------------------------------------

def _negative_zeros(t: torch.Tensor) -> int:
    return int(((t == 0) & torch.signbit(t)).sum())


def test_apply_keep_mask_writes_positive_zeros():
    t = torch.tensor([[-1.0, 2.0, -3.0, -0.5], [0.25, -0.0, -7.0, 1.0]])
    keep = torch.tensor([[False, True, False, True], [False, False, True, False]])
    out = apply_keep_mask(t, keep)
    assert out is t  # in place
    assert torch.equal(t[~keep], torch.zeros(int((~keep).sum()))) and not torch.signbit(t[~keep]).any()
    assert torch.equal(t[keep], torch.tensor([2.0, -0.5, -7.0]))
    assert (-1.0 * torch.tensor(0.0)).signbit()  # what a multiplication by the mask would have written


def test_prune_model_and_magnitude_prune_leave_no_negative_zero():
    model = _wrapped()
    prune_model(model, 0.5)
    for name, layer in masked_layers(model).items():
        assert (layer.weight == 0).any() and _negative_zeros(layer.weight) == 0, name
        assert _negative_zeros(layer.mask) == 0, name
    merge_and_unload(model)
    for name, layer in _targets_of(model).items():
        assert _negative_zeros(layer.weight) == 0, name

    plain = tiny_model("gpt2")  # Conv1D: (in, out) layout
    magnitude_prune(plain, None, "2:4")
    for name, layer in _targets_of(plain).items():
        assert (layer.weight == 0).any() and _negative_zeros(layer.weight) == 0, name


@pytest.mark.parametrize("method", sorted(ONESHOT_CONFIGS))
def test_oneshot_prune_leaves_no_negative_zero(method):
    model = tiny_model()
    report = oneshot_prune(model, tiny_inputs(batch=4, length=16), method, 0.5)
    for name, layer in _targets_of(model).items():
        pruned = layer.weight[~report.masks[name]]
        assert pruned.numel() and torch.equal(pruned, torch.zeros_like(pruned)), name
        assert _negative_zeros(layer.weight) == 0, name


@pytest.mark.parametrize("method", ["pilot", "finetune"])
def test_the_trainers_recovery_phase_leaves_no_negative_zero(tmp_path, method):
    from transformers import TrainerCallback

    seen = []

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if trainer.frozen:  # the recovery phase: the pattern is frozen
                seen.append(sum(_negative_zeros(p) for p, _ in trainer.frozen))
                assert all(bool((p[~keep] == 0).all()) for p, keep in trainer.frozen)

    trainer = make_trainer(tmp_path, method=method, max_steps=8, recovery_steps=4, alpha_update_interval=2,
                           sparsity=0.5, logging_steps=4, disable_tqdm=True)
    trainer.add_callback(Check())
    trainer.train()
    assert len(seen) >= 4 and not any(seen), seen
    for name, layer in _targets_of(trainer.model).items():
        assert float((layer.weight == 0).float().mean()) == 0.5 and _negative_zeros(layer.weight) == 0, name
