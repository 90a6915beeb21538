"""The default learning rate: relative_learning_rate x the RMS of the target weights of the model as given."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from helpers import arithmetic_dataset, make_args

from pilot_hf import PILoTTrainer, PILoTTrainingArguments
from pilot_hf.wrapping import find_target_layers, weight_rms


def _rms_by_hand(model) -> float:
    weights = [layer.weight.detach().flatten() for layer in find_target_layers(model).values()]
    return torch.cat(weights).pow(2).mean().sqrt().item()


def _trainer(tmp_path, model, **kw):
    return PILoTTrainer(model=model, args=make_args(tmp_path, **kw), train_dataset=arithmetic_dataset())


def test_weight_rms_is_over_all_target_weights_together():
    model = tiny_model()
    assert weight_rms(model) == pytest.approx(_rms_by_hand(model), rel=1e-6)


def test_unset_learning_rate_follows_the_weights_scale(tmp_path):
    """The same model with weights 10x larger gets a 10x larger step; the optimizer and the record use it."""
    model, scaled = tiny_model(), tiny_model()
    with torch.no_grad():
        for layer in find_target_layers(scaled).values():
            layer.weight.mul_(10)
    rms = _rms_by_hand(model)
    trainer = _trainer(tmp_path, model, learning_rate=None, relative_learning_rate=2e-3, method="finetune")
    big = _trainer(tmp_path, scaled, learning_rate=None, relative_learning_rate=2e-3, method="finetune")
    assert trainer.args.learning_rate == float(f"{2e-3 * rms:.3g}")
    assert big.args.learning_rate == pytest.approx(10 * trainer.args.learning_rate, rel=2e-3)
    trainer.create_optimizer()
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {trainer.args.learning_rate}
    settings = trainer.args.run_settings()
    assert (settings["learning_rate"], settings["relative_learning_rate"]) == (trainer.args.learning_rate, 2e-3)


def test_a_given_learning_rate_is_kept_and_records_no_rule(tmp_path):
    args = make_args(tmp_path, learning_rate=3e-4)
    assert args.for_model(tiny_model()) is args
    trainer = PILoTTrainer(model=tiny_model(), args=args, train_dataset=arithmetic_dataset())
    assert trainer.args.learning_rate == 3e-4 and "relative_learning_rate" not in trainer.args.run_settings()


def test_the_rule_is_measured_before_the_warm_start_prunes(tmp_path):
    model = tiny_model()
    rms = _rms_by_hand(model)
    trainer = _trainer(tmp_path, model, learning_rate=None, sparsity=0.5, warm_start="magnitude", method="finetune")
    assert trainer.args.learning_rate == float(f"{5e-4 * rms:.3g}")
    assert _rms_by_hand(trainer.model) < rms  # pruned by now


def test_the_callers_arguments_are_not_changed(tmp_path):
    args = make_args(tmp_path, learning_rate=None)
    trainer = PILoTTrainer(model=tiny_model(), args=args, train_dataset=arithmetic_dataset())
    assert args.learning_rate is None and trainer.args.learning_rate > 0
    assert args.run_settings()["relative_learning_rate"] == 5e-4


@pytest.mark.parametrize("bad, message", [
    ({"learning_rate": 0.0}, "learning_rate=0.0: must be a finite number > 0"),
    ({"relative_learning_rate": -1.0}, "relative_learning_rate=-1.0: must be a finite number > 0"),
])
def test_bad_learning_rates_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        PILoTTrainingArguments(output_dir=str(tmp_path), **bad)


def test_lora_adapters_get_their_own_default_learning_rate(tmp_path):
    """Adapters start at zero, so the weights' scale says nothing about their step: LoRA keeps a fixed default."""
    from pilot_hf.lora import ADAPTER_LEARNING_RATE, sparse_lora_config, train_sparse_lora
    from pilot_hf.wrapping import magnitude_prune

    model = tiny_model()
    magnitude_prune(model, 0.5, "unstructured")
    args = make_args(tmp_path, learning_rate=None, max_steps=1, method="finetune")
    _, trainer, _ = train_sparse_lora(model, sparse_lora_config(model, r=2), args, train_dataset=arithmetic_dataset())
    assert trainer.args.learning_rate == ADAPTER_LEARNING_RATE and args.learning_rate is None
