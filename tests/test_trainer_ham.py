"""HAM (docs/METHOD.md section 11) as an option of every trained method: its step is the formula, zeros stay
exactly zero under every path, resume is bit-identical, gradient accumulation and GradScaler skips behave as
for the base optimizer, and the run settings, sweep cells and resume check carry it."""

import pytest
import torch
from conftest import tiny_model
from helpers import arithmetic_dataset, make_args
from transformers import TrainerCallback

from pilot_hf import PILoTTrainer, find_target_layers, magnitude_prune, masked_layers
from pilot_hf import schedule as schedule_module
from pilot_hf.ham import HAMTarget, ham_step
from pilot_hf.methods import MethodSpec
from pilot_hf.sweep import cell_arguments


def expected_ham(x, g, lr, alpha, beta):
    """The update of docs/METHOD.md section 11, written out: x · exp(clamp(−lr(α sign(x) g / RMS(g) + β), ±5))."""
    rms = g.pow(2).mean().sqrt()
    return x * torch.exp(torch.clamp(-lr * (alpha * torch.sign(x) * g / rms + beta), -5, 5))


def test_ham_step_is_the_formula_and_keeps_zeros():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    w[0, :3] = 0.0
    w[1, 0] = -0.0
    grad = torch.randn(6, 8, generator=g)
    grad[2, 2] = 1e3  # an outlier: the clamp binds
    weight = torch.nn.Parameter(w.clone())
    weight.grad = grad.clone()
    ham_step([HAMTarget(weight, None, lr=0.1)], alpha=30.0, beta=2.0)
    torch.testing.assert_close(weight.detach(), expected_ham(w, grad, 0.1, 30.0, 2.0), rtol=1e-6, atol=0)
    assert torch.equal(weight == 0, w == 0) and torch.signbit(weight[1, 0])  # zeros (-0.0 too) untouched
    assert float(weight.detach()[2, 2] / w[2, 2]) == pytest.approx(float(torch.exp(-5.0 * torch.sign(w[2, 2]))))


def test_ham_step_on_bfloat16_weights_computes_in_float32():
    g = torch.Generator().manual_seed(2)
    w, grad = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(4, 8, generator=g).bfloat16()
    weight = torch.nn.Parameter(w.clone())
    weight.grad = grad
    ham_step([HAMTarget(weight, None, lr=0.1)], alpha=10.0, beta=1.0)
    expected = expected_ham(w.float(), grad.float(), 0.1, 10.0, 1.0).bfloat16()
    assert weight.dtype == torch.bfloat16 and torch.equal(weight.detach(), expected)


def test_ham_on_mask_times_weight_scales_the_product_as_a_plain_weight():
    """x = m ⊙ w: the weight takes the factor, with ∂f/∂x = weight.grad / m; the product moves as a plain x."""
    g = torch.Generator().manual_seed(1)
    mask, w = torch.rand(4, 8, generator=g) + 0.5, torch.randn(4, 8, generator=g)
    mask[0, 0] = w[0, 1] = 0.0  # a pruned factor on either side: x = 0 stays 0
    grad_x = torch.randn(4, 8, generator=g)
    weight = torch.nn.Parameter(w.clone())
    weight.grad = grad_x * mask  # the chain rule: ∂f/∂w = ∂f/∂x ⊙ m
    ham_step([HAMTarget(weight, torch.nn.Parameter(mask), lr=0.05)], alpha=10.0, beta=1.0)
    grad_x[0, 0] = 0.0  # m = 0: x has no factor to move, its gradient does not count
    torch.testing.assert_close(mask * weight.detach(), expected_ham(mask * w, grad_x, 0.05, 10.0, 1.0),
                               rtol=1e-6, atol=1e-7)
    assert float(weight.detach()[0, 1]) == 0.0


@pytest.mark.parametrize("method", ["finetune", "pilot"])
def test_one_trainer_step_is_sgd_then_ham(tmp_path, method):
    """Through PILoTTrainer: after SGD's step, each target weight is exactly the hand-computed HAM update
    with the gradient the optimizer used and its group's learning rate."""
    lr, alpha, beta = 0.05, 20.0, 3.0
    trainer = PILoTTrainer(model=tiny_model("llama"), train_dataset=arithmetic_dataset(), args=make_args(
        tmp_path, method=method, sparsity=0, max_steps=1, optim="sgd", learning_rate=lr, mask_learning_rate=None,
        lr_scheduler_type="constant", ham=True, ham_alpha=alpha, ham_beta=beta, alpha_schedule="none"
        if method == "finetune" else "constant", alpha_init=1e-3))
    layers = masked_layers(trainer.model) or find_target_layers(trainer.model)
    seen = {}

    def before(optimizer, *_):  # runs after the regularization hook: the gradient SGD and HAM see
        seen.update({n: (m.weight.detach().clone(), m.weight.grad.clone()) for n, m in layers.items()})

    trainer.create_optimizer().register_step_pre_hook(before)
    trainer.finish = lambda: trainer.model  # keep the wrappers to look at mask and weight
    trainer.train()
    for name, layer in layers.items():
        w, grad = seen[name]
        stepped = w - lr * grad  # plain SGD
        if method == "finetune":
            expected = expected_ham(stepped, grad, lr, alpha, beta)
        else:  # the product moves as a plain weight with ∂f/∂x = grad / m (m > 0 here; m after SGD's step)
            mask = layer.mask.detach()
            expected = expected_ham(mask * stepped, grad / mask, lr, alpha, beta) / mask
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=2e-6, atol=1e-8)
        assert not torch.equal(layer.weight.detach(), stepped), name


PATHS = {  # every path that prunes or holds a pattern, each with HAM strong enough to matter
    "unstructured": dict(method="pilot", sparsity=0.5),
    "2:4": dict(method="pilot", sparsity=None, sparsity_pattern="2:4"),
    "gmp": dict(method="gmp", sparsity=0.6, gmp_interval=3, max_steps=16, recovery_steps=4),
    "recovery": dict(method="finetune", sparsity=0.5, warm_start="magnitude", recovery_steps=8),
    "finetune": dict(method="finetune", sparsity=0, keep_zeros=True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_zero_sets_are_exact_under_every_path(tmp_path, path, monkeypatch):
    """Every HAM step leaves the zero set of every tensor it scales unchanged (torch.equal on p == 0), and a
    frozen pattern (gmp, recovery, keep_zeros) is exactly the model's zero set after every later step."""
    model = tiny_model("llama")
    if path == "finetune":
        magnitude_prune(model, 0.5, "2:4")
    initial_zeros = {n: (m.weight == 0).clone() for n, m in find_target_layers(model).items()}
    checked = []

    def ham_checking_zeros(targets, alpha, beta):
        before = [(t.weight == 0).clone() for t in targets]
        ham_step(targets, alpha, beta)
        assert all(torch.equal(t.weight == 0, z) for t, z in zip(targets, before))
        checked.append(sum(int(z.sum()) for z in before))

    monkeypatch.setattr(schedule_module, "ham_step", ham_checking_zeros)
    args = make_args(tmp_path, ham=True, ham_alpha=10.0, ham_beta=1.0, learning_rate=1e-2,
                     **{"max_steps": 12, **PATHS[path]})
    trainer = PILoTTrainer(model=model, args=args, train_dataset=arithmetic_dataset())
    frozen_ok = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # every entry of the frozen pattern is 0
            frozen_ok.extend(bool((p[~keep] == 0).all()) for p, keep in trainer.frozen)

    trainer.add_callback(Probe())
    trainer.train()
    assert len(checked) == args.max_steps
    if path not in ("unstructured", "2:4"):  # pruned during training: HAM ran on tensors holding zeros
        assert frozen_ok and all(frozen_ok) and checked[-1] > 0
    for name, layer in find_target_layers(trainer.model).items():
        zeros = layer.weight == 0
        if path == "finetune":
            assert torch.equal(zeros, initial_zeros[name]), name
        elif path == "2:4":
            assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert int(zeros.sum()) == round(args.sparsity * zeros.numel()), name


class Stop(Exception):
    pass


class StopAtSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Stop


@pytest.mark.parametrize("method", ["gmp", "pilot"])
def test_resume_with_ham_is_bit_identical(tmp_path, method):
    def trainer(folder):
        args = make_args(tmp_path / folder, method=method, sparsity=0.5, max_steps=16, recovery_steps=4,
                         gmp_interval=3, alpha_update_interval=3, save_strategy="steps", save_steps=5, ham=True,
                         ham_alpha=30.0, ham_beta=1.0)
        return PILoTTrainer(model=tiny_model("llama"), args=args, train_dataset=arithmetic_dataset())

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    first.add_callback(StopAtSave(10))
    with pytest.raises(Stop):
        first.train()
    resumed = trainer("b")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.controller.history == straight.controller.history
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_gradient_accumulation_2x1_equals_1x2_as_for_the_base_optimizer(tmp_path):
    """Batch 8 in one micro-batch and 4 + 4 accumulated give the same weights with HAM as without: HAM adds
    no difference of its own (it steps once per optimizer step, on the accumulated gradient)."""
    def final(ham, batch, accumulation):
        args = make_args(tmp_path / f"{ham}{batch}", method="finetune", sparsity=0.5, max_steps=6, ham=ham,
                         ham_alpha=30.0, ham_beta=1.0, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation)
        t = PILoTTrainer(model=tiny_model("llama"), args=args, train_dataset=arithmetic_dataset())
        t.train()
        return {n: m.weight.detach() for n, m in find_target_layers(t.model).items()}

    def largest_difference(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in a)

    base = largest_difference(final(False, 8, 1), final(False, 4, 2))
    with_ham = final(True, 8, 1), final(True, 4, 2)
    assert largest_difference(*with_ham) <= max(4 * base, 1e-6), (largest_difference(*with_ham), base)
    assert largest_difference(with_ham[0], final(False, 8, 1)) > 1e-3  # and HAM did change the result


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd"])
def test_a_step_the_grad_scaler_skips_has_no_ham_step(tmp_path, optim):
    """Mixed precision: when GradScaler finds inf/NaN, the step is skipped, HAM's too: SGD's step() is not
    called at all; fused AdamW (Trainer's default) is called with `found_inf` and skips inside."""
    trainer = PILoTTrainer(model=tiny_model("llama"), train_dataset=arithmetic_dataset(), args=make_args(
        tmp_path, method="finetune", sparsity=0, ham=True, ham_alpha=30.0, ham_beta=1.0, optim=optim))
    optimizer = trainer.create_optimizer()
    inner = getattr(optimizer, "optimizer", optimizer)
    assert getattr(inner, "_step_supports_amp_scaling", False) == (optim == "adamw_torch_fused")
    trainer.state.max_steps = 20  # the schedule starts at train begin; emulate it
    trainer._on_train_begin()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))  # initializes the scale, as a scaled backward would
    weights = [m.weight for m in find_target_layers(trainer.model).values()]
    before = [w.detach().clone() for w in weights]
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    weights[0].grad[0, 0] = float("inf")
    scaler.step(inner)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # skipped: no AdamW, no HAM
    scaler.update()
    for w in weights:
        w.grad = torch.ones_like(w)
    scaler.step(inner)
    assert all(not torch.equal(w, b) for w, b in zip(weights, before))


def test_run_settings_resume_check_and_sweep_cells_carry_ham(tmp_path):
    on = make_args(tmp_path, method="gmp", sparsity=0.5, ham=True, ham_alpha=3.0, ham_beta=0.5)
    assert {k: on.run_settings()[k] for k in ("ham", "ham_alpha", "ham_beta")} == \
        {"ham": True, "ham_alpha": 3.0, "ham_beta": 0.5}
    assert "ham" not in make_args(tmp_path).run_settings()  # records of runs without HAM read as before
    for bad in (dict(ham_alpha=-1.0), dict(ham_beta=float("inf"))):
        with pytest.raises(ValueError, match="must be a finite number ≥ 0"):
            make_args(tmp_path, **bad)

    # Sweep cells: '+ham' round-trips and is the only way a cell gets HAM, with the shared strengths.
    for name in ("gmp+ham", "finetune+wanda+ham", "pilot+sparsegpt+ham+kd", "pilot+kd", "finetune+wanda"):
        assert str(MethodSpec.parse(name)) == name
    for bad in ("gmp+kd+ham", "wanda+ham", "dense+ham", "finetune+ham+wanda", "gmp+ham+ham"):
        with pytest.raises(ValueError, match="unknown method"):
            MethodSpec.parse(bad)
    shared = make_args(tmp_path, ham=True, ham_alpha=7.0)
    cell = cell_arguments(shared, MethodSpec.parse("finetune+wanda+ham"), "0.5", str(tmp_path / "cell"))
    assert (cell.method, cell.warm_start, cell.ham, cell.ham_alpha) == ("finetune", "wanda", True, 7.0)
    assert not cell_arguments(shared, MethodSpec.parse("finetune+wanda"), "0.5", str(tmp_path / "c")).ham


def test_resume_refuses_to_switch_ham_on(tmp_path):
    def trainer(**kw):
        args = make_args(tmp_path, method="finetune", sparsity=0.5, save_strategy="steps", save_steps=5, **kw)
        return PILoTTrainer(model=tiny_model("llama"), args=args, train_dataset=arithmetic_dataset())

    first = trainer()
    first.add_callback(StopAtSave(5))
    with pytest.raises(Stop):
        first.train()
    with pytest.raises(ValueError, match="ham: checkpoint None vs now True"):
        trainer(ham=True).train(resume_from_checkpoint=True)


def test_ham_is_on_by_default_when_the_run_prunes_and_follows_the_target(tmp_path):
    from pilot_hf import PILoTTrainingArguments

    def args(**kw):
        return PILoTTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, use_cpu=True, **kw)

    assert args().ham and args(sparsity_pattern="2:4").ham and args(method="gmp", warm_start="none").ham
    assert args().run_settings()["ham"] is True  # the record says so
    assert not args(sparsity=0.0, warm_start="none").ham  # nothing pruned: the optimizer's own step
    assert not args(ham=False).ham and args(sparsity=0.0, warm_start="none", ham=True).ham  # a choice is kept
    # A copy for another target re-resolves a default, and keeps a value the default would not give.
    assert not args().with_method("finetune", sparsity=0.0, warm_start=None).ham
    assert args(sparsity=0.0, warm_start="none").with_method("gmp", sparsity=0.5).ham
    assert not args(ham=False).with_method("finetune", sparsity=0.7).ham


def test_the_command_line_turns_ham_on_and_off_and_finetune_leaves_it_off_unless_asked(tmp_path):
    from pilot_hf.commands import command_module, parse_command_line
    from pilot_hf.commands.finetune import finetune_training_args

    def parsed(command, *flags):
        module = command_module(command)
        arguments, line = parse_command_line(command, ["--output_dir", str(tmp_path / "o"), "--use_cpu", "true",
                                                       "--dataset_name", "builtin:kjv",
                                                       *flags], module.ARGUMENTS)
        return {type(a).__name__: a for a in arguments}, line

    for flags, expected in (((), True), (("--ham",), True), (("--ham", "false"), False)):
        arguments, _ = parsed("compress", "--model_name_or_path", "m", *flags)
        assert arguments["PILoTTrainingArguments"].ham is expected, flags
    for flags, expected in (((), False), (("--ham",), True)):
        arguments, line = parsed("finetune", "--model_name_or_path", "m", *flags)
        ft = finetune_training_args(arguments["PILoTTrainingArguments"], arguments["FinetuneArguments"], line.given)
        assert ft.ham is expected, flags
    arguments, line = parsed("finetune", "--model_name_or_path", "m", "--lora")  # HAM's default is no refusal
    assert not finetune_training_args(arguments["PILoTTrainingArguments"], arguments["FinetuneArguments"],
                                      line.given).ham
