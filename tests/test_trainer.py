import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from helpers import arithmetic_dataset, make_args, make_trainer
from transformers import TrainerCallback

from pilot_hf import PILoTTrainer, is_wrapped, masked_layers


def test_loss_goes_down_and_result_is_exactly_sparse(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=40, sparsity=0.5, recovery_steps=10)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.1
    assert not is_wrapped(trainer.model)
    for name, layer in trainer.sparsity_report["layers"].items():
        assert layer["zeros"] == round(0.5 * layer["numel"]), name
    logged = [h for h in trainer.state.log_history if "loss" in h][0]
    assert {"alpha", "balance", "l1_ratio", "prune_damage", "sparsity"} <= set(logged)


def test_regularization_gradient_is_exactly_2_alpha_p(tmp_path):
    trainer = make_trainer(tmp_path, alpha_init=3e-3, mask_learning_rate=5e-3)
    optimizer = trainer.create_optimizer()
    trainer.state.max_steps = 20  # the controller is created at train begin; emulate it
    trainer._on_train_begin()
    params = dict(trainer.model.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)
    trainer._regularize(optimizer)
    masked = masked_layers(trainer.model)
    regularized = {f"{n}.{k}" for n in masked for k in ("mask", "weight")}
    assert regularized and set(trainer.regularized) == regularized
    for name, p in params.items():
        expected = 2 * 3e-3 * p.detach() if name in regularized else torch.zeros_like(p)
        assert torch.equal(p.grad, expected), name
    # masks have their own learning rate group, and no weight decay on masks or weights
    groups = [g for g in optimizer.param_groups if g["lr"] == trainer.args.mask_learning_rate]
    assert len(groups) == 1
    assert {id(p) for p in groups[0]["params"]} == {id(m.mask) for m in masked.values()}
    for g in optimizer.param_groups:
        if any(id(p) in trainer._regularized_ids for p in g["params"]):
            assert g["weight_decay"] == 0.0


@pytest.mark.parametrize("method", ["pilot", "l1", "finetune"])
def test_target_weights_get_their_own_learning_rate_and_keep_their_decay(tmp_path, method):
    trainer = make_trainer(tmp_path, method=method, learning_rate=1e-4, mask_learning_rate=2e-3,
                           weight_learning_rate=3e-3, weight_decay=0.01)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    targets = trainer._targets()
    assert len(lr_of) == sum(p.requires_grad for p in trainer.model.parameters())  # nothing lost or doubled
    for name, p in trainer.model.named_parameters():
        layer, _, kind = name.rpartition(".")
        if layer in targets and kind == "mask":
            assert lr_of[id(p)] == 2e-3, name
        elif layer in targets and kind == "weight":
            assert lr_of[id(p)] == 3e-3, name
            # α replaces weight decay on regularized weights; plain fine-tuning keeps the ordinary decay
            assert decay_of[id(p)] == (0.01 if method == "finetune" else 0.0), name
        else:
            assert lr_of[id(p)] == 1e-4, name


@pytest.mark.parametrize("method", ["pilot", "finetune"])
def test_tensorwise_second_moment_for_target_tensors_only(tmp_path, method):
    from pilot_hf.optim import TensorwiseAdamW

    trainer = make_trainer(tmp_path, method=method, tensorwise_second_moment=True, max_steps=6, recovery_steps=2,
                           alpha_update_interval=2)
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, TensorwiseAdamW)
    targets = set(trainer.sparsity_report["layers"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            scalar = optimizer.state[p]["exp_avg_sq"].dim() == 0
            assert scalar == group["tensorwise"]
    tensorwise = sum(len(g["params"]) for g in optimizer.param_groups if g["tensorwise"])
    assert tensorwise == len(targets) * (2 if method == "pilot" else 1)  # mask and weight, or the plain weight
    for name, layer in trainer.sparsity_report["layers"].items():
        assert layer["zeros"] == round(0.5 * layer["numel"]), name
    with pytest.raises(ValueError, match="tensorwise_second_moment replaces AdamW"):
        make_args(tmp_path, tensorwise_second_moment=True, optim="sgd")


def test_balance_decays_as_predicted_under_constant_alpha_and_sgd(tmp_path):
    """docs/METHOD.md §4: with coupled decay, m² − w² shrinks by (1 − 2ηα)² − η²g² per SGD step, ≈ exp(−4ηαt)."""
    lr, alpha, steps = 0.05, 0.1, 20
    trainer = make_trainer(tmp_path, method="spred", beta=1.0, init="pilot", alpha_schedule="constant",
                           alpha_init=alpha, optim="sgd", learning_rate=lr, mask_learning_rate=None,
                           lr_scheduler_type="constant", max_steps=steps, sparsity=0, max_grad_norm=0.0)
    before = {n: (m.mask.detach() ** 2 - m.weight.detach() ** 2).clone() for n, m in masked_layers(trainer.model).items()}
    trainer.train_dataset = arithmetic_dataset()
    model = trainer.model
    layers = masked_layers(model)
    trainer.args.sparsity = 0.0

    balances = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            balances.append(trainer.diagnostics()["balance"])

    trainer.add_callback(Probe())
    # Keep the wrappers to measure after training: stop finish() from merging.
    trainer.finish = lambda: model
    trainer.train()
    predicted = (1 - 2 * lr * alpha) ** (2 * steps)
    measured = balances[-1]
    assert measured == pytest.approx(predicted, rel=2e-3), (measured, predicted)
    assert predicted == pytest.approx(torch.exp(torch.tensor(-4 * lr * alpha * steps)).item(), rel=0.01)
    for n, m in layers.items():  # elementwise too: every entry decays by the same factor (up to η²g²)
        after = m.mask.detach() ** 2 - m.weight.detach() ** 2
        torch.testing.assert_close(after, before[n] * predicted, rtol=5e-3, atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def resume_args(tmp_path, name, **kw):
    return dict(output_dir=str(tmp_path / name), max_steps=20, save_strategy="steps", save_steps=10,
                alpha_update_interval=3, sparsity=0.5, recovery_steps=5, **kw)


def test_resume_gives_same_weights_and_alpha_trajectory(tmp_path):
    full = make_trainer(tmp_path, **resume_args(tmp_path, "full"))
    full.train()

    interrupted = make_trainer(tmp_path, **resume_args(tmp_path, "resumed"))
    interrupted.add_callback(StopAt(10))
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-10"
    assert (checkpoint / "pilot_state.json").is_file()

    resumed = make_trainer(tmp_path, **resume_args(tmp_path, "resumed"))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.controller.history == full.controller.history
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[q] == 0, b[q] == 0) and (a[q] == 0).float().mean() == 0.5
    assert resumed.state.global_step == 20 and len(full.controller.history) == 5


def test_resume_with_other_settings_is_refused_before_any_step(tmp_path):
    first = make_trainer(tmp_path, **resume_args(tmp_path, "run"))
    first.add_callback(StopAt(10))
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-10"
    listing = sorted(os.listdir(tmp_path / "run"))
    other = make_trainer(tmp_path, **{**resume_args(tmp_path, "run"), "delta": 3.0})
    with pytest.raises(ValueError, match="delta: checkpoint 2.0 vs now 3.0"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert other.state.global_step == 0
    assert sorted(os.listdir(tmp_path / "run")) == listing


def test_saved_model_is_sparse_and_loads_without_pilot_hf(tmp_path):
    trainer = make_trainer(tmp_path, sparsity=0.5, sparsity_pattern="2:4")
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "model.safetensors").is_file()
    x = tiny_inputs()
    with torch.no_grad():
        expected = trainer.model(x).logits
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
assert 'pilot_hf' not in sys.modules
x = torch.tensor({x.tolist()})
with torch.no_grad():
    torch.save(m(x).logits, {str(tmp_path / 'logits.pt')!r})
W = m.model.layers[0].mlp.down_proj.weight
groups = (W.reshape(W.shape[0], -1, 4) != 0).sum(-1)
assert int(groups.max()) <= 2, groups.max()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize("method", ["spred", "l1", "finetune"])
def test_ablation_methods_reach_exact_sparsity(tmp_path, method):
    trainer = make_trainer(tmp_path, method=method, sparsity=0.5, sparsity_pattern="row")
    trainer.train()
    assert not is_wrapped(trainer.model)
    assert trainer.sparsity_report["total"]["sparsity"] == 0.5
    W = trainer.model.model.layers[1].self_attn.o_proj.weight
    assert ((W == 0).sum(1) == W.shape[1] // 2).all()


def test_l1_regularization_gradient_is_alpha_sign(tmp_path):
    trainer = make_trainer(tmp_path, method="l1", alpha_init=1e-3)
    optimizer = trainer.create_optimizer()
    trainer.state.max_steps = 20
    trainer._on_train_begin()
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    trainer._regularize(optimizer)
    q = trainer.model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q.grad, 1e-3 * q.detach().sign())
    assert torch.equal(trainer.model.model.embed_tokens.weight.grad, torch.zeros_like(q.grad[:1]).new_zeros(
        trainer.model.model.embed_tokens.weight.shape))


def test_gradient_accumulation_checkpointing_eval_and_sgd(tmp_path):
    trainer = PILoTTrainer(
        model=tiny_model("gpt2"),
        args=make_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                       activation_checkpointing=True, eval_strategy="steps", eval_steps=10, optim="sgd",
                       optim_args="momentum=0.9", learning_rate=1e-2, sparsity=0.5),
        train_dataset=arithmetic_dataset(), eval_dataset=arithmetic_dataset(16, seed=1))
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "SGD"
    assert trainer.optimizer.optimizer.param_groups[0]["momentum"] == 0.9
    assert any("eval_loss" in h for h in trainer.state.log_history)
    assert len(trainer.controller.history) == 4
    assert trainer.sparsity_report["total"]["sparsity"] == 0.5


@pytest.mark.parametrize("bad,match", [
    (dict(alpha_init=-1.0), "alpha_min"),
    (dict(alpha_min=1e-3, alpha_init=1e-4), "alpha_min"),
    (dict(alpha_init=0.0), "alpha_init"),
    (dict(delta=1.0), "delta"),
    (dict(delta=0.5), "delta"),
    (dict(sparsity=0, recovery_steps=5), "recovery_steps"),
    (dict(recovery_steps=20), "recovery_steps"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity_pattern="4:4"), "0 < N < M"),
    (dict(method="magic"), "method"),
    (dict(alpha_schedule="exponential", alpha_final=0.0), "alpha_final"),
    (dict(alpha_update_interval=0), "alpha_update_interval"),
    (dict(beta=0.0), "beta"),
])
def test_bad_arguments(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **bad)
    assert not (tmp_path / "out").exists()


def test_pattern_the_shapes_do_not_allow_fails_before_training(tmp_path):
    args = make_args(tmp_path, sparsity=None, sparsity_pattern="3:5")  # in_features 32, 64: not multiples of 5
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="divisible by 5"):
        PILoTTrainer(model=model, args=args, train_dataset=arithmetic_dataset())
    assert not is_wrapped(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_pilot_state_json_is_plain_json(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=10)
    trainer.train()
    state = json.loads((tmp_path / "out" / "checkpoint-10" / "pilot_state.json").read_text())
    assert state["settings"]["method"] == "pilot" and state["controller"]["schedule"] == "pilot"


def test_regularization_through_the_loss_gives_the_same_gradient(tmp_path, monkeypatch):
    """The DeepSpeed path (penalty in the loss) and the optimizer-hook path give the same gradients."""
    grads = {}
    for in_loss in (False, True):
        trainer = make_trainer(tmp_path, alpha_init=2e-3, max_steps=1, gradient_accumulation_steps=2,
                               per_device_train_batch_size=4, sparsity=0)
        monkeypatch.setattr(PILoTTrainer, "regularize_in_loss", property(lambda self, v=in_loss: v))
        seen = {}

        def capture(optimizer, *_, trainer=trainer, seen=seen):  # runs after the regularization hook
            seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

        trainer.create_optimizer().register_step_pre_hook(capture)
        trainer.train()
        grads[in_loss] = seen
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-7)


def test_create_model_card_describes_the_run(tmp_path):
    from huggingface_hub import ModelCard

    trainer = make_trainer(tmp_path, sparsity=0.5)
    trainer.train()
    trainer.create_model_card(finetuned_from="org/base-model", tags=["demo"])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "org/base-model"
    assert {"sparse", "pilot", "demo"} <= set(card.data.tags)
    assert "Mask in the Mirror" in card.text and "alpha_init" in card.text


@pytest.mark.slow
def test_torch_compile_on(tmp_path):
    trainer = make_trainer(tmp_path, torch_compile=True, max_steps=6, alpha_update_interval=2, sparsity=0.5)
    trainer.train()
    assert len(trainer.controller.history) == 3
    assert len(trainer._regularized_ids) == len(trainer.regularized) > 0  # compile's name prefixes are stripped
    assert trainer.sparsity_report["total"]["sparsity"] == 0.5


def test_bf16_mixed_precision_on_cpu(tmp_path):
    """bf16 autocast (CPU here; the same Trainer path on GPUs): masks/weights stay fp32, training works."""
    trainer = make_trainer(tmp_path, bf16=True, sparsity=0.5, max_steps=10)
    layers = masked_layers(trainer.model)
    assert all(m.mask.dtype == m.weight.dtype == torch.float32 for m in layers.values())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.sparsity_report["total"]["sparsity"] == 0.5
