"""PILoTTrainer as an API: what it accepts, what it keeps, and what it records (tiny models, a few steps)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import PLAIN_TRAINING, tiny_model
from helpers import arithmetic_dataset
from helpers import make_trainer as _make_trainer
from transformers import TrainerCallback, TrainingArguments

from pilot_hf import (
    PILoTConfig,
    PILoTTrainer,
    PILoTTrainingArguments,
    is_wrapped,
    masked_layers,
    oneshot_prune,
    render_model_card,
    wrap_model,
)
from pilot_hf.data import calibration_blocks
from pilot_hf.wrapping import find_target_layers

TOKEN = "hf_PILoTtestTOKENabcdefghijklmnop"  # not a real token: only looked for in pickles


COMMON = dict(per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)


def make_args(tmp_path, **kw):
    base = dict(**PLAIN_TRAINING, output_dir=str(tmp_path / "out"), max_steps=8, learning_rate=1e-3, logging_steps=4,
                save_strategy="no", alpha_update_interval=4, **COMMON)
    base.update(kw)
    return PILoTTrainingArguments(**base)


def make_trainer(tmp_path, arch="llama", **kw):
    return _make_trainer(tmp_path, arch, args=make_args(tmp_path, **kw))


def _exactly_half(report: dict) -> bool:
    return all(layer["zeros"] == layer["numel"] // 2 for layer in report["layers"].values())


# ----- 1. a plain TrainingArguments ----------------------------------------------------------------------

def test_plain_training_arguments_are_converted_and_train_to_the_default_sparsity(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path / "plain"), learning_rate=2e-3, max_steps=6, seed=7,
                              logging_steps=3, save_strategy="no", hub_token=TOKEN,
                              **{k: v for k, v in COMMON.items() if k != "seed"})
    # (first: building any TrainingArguments resets Accelerate's global state, which a built Trainer uses)
    defaults = PILoTTrainingArguments(output_dir=str(tmp_path / "d"), use_cpu=True)
    trainer = PILoTTrainer(model=tiny_model(), args=plain, train_dataset=arithmetic_dataset())
    args = trainer.args
    assert isinstance(args, PILoTTrainingArguments)
    assert (args.learning_rate, args.max_steps, args.seed, args.output_dir) == (2e-3, 6, 7, plain.output_dir)
    assert args.per_device_train_batch_size == 8 and args.hub_token == TOKEN
    for name in ("method", "warm_start", "sparsity", "sparsity_pattern", "alpha_init", "alpha_schedule", "delta",
                 "mask_learning_rate", "beta", "init", "target_modules", "regularization", "lm_loss_weight",
                 "distill_logit_weight", "distill_feature_weight"):
        assert getattr(args, name) == getattr(defaults, name), name
    assert args.recovery_steps == 6 // 4  # the default is a share of the budget (a quarter of max_steps)
    assert args.sparsity == 0.5 and args.method == "pilot"
    assert TOKEN.encode() not in pickle.dumps(args)
    trainer.train()
    assert not is_wrapped(trainer.model) and trainer.state.global_step == 6
    report = trainer.sparsity_report
    assert set(report["layers"]) == set(find_target_layers(trainer.model)) and _exactly_half(report)
    assert report["total"]["sparsity"] == 0.5


def test_other_argument_types_are_refused(tmp_path):
    with pytest.raises(TypeError, match="TrainingArguments"):
        PILoTTrainer(model=tiny_model(), args={"learning_rate": 1e-3})


# ----- 2. a model the user wrapped keeps its config --------------------------------------------------------

USER_CONFIG = dict(target_modules=["q_proj", "v_proj"], beta=0.5)


def _user_wrapped_trainer(tmp_path, **kw):
    model = wrap_model(tiny_model(), PILoTConfig(**USER_CONFIG))
    return PILoTTrainer(model=model, args=make_args(tmp_path, **kw), train_dataset=arithmetic_dataset())


def test_a_user_wrapped_model_keeps_its_targets_and_beta(tmp_path):
    trainer = _user_wrapped_trainer(tmp_path, learning_rate=1e-4, mask_learning_rate=1e-4)
    names = set(masked_layers(trainer.model))
    assert names and {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert trainer.pilot_config.beta == 0.5 and trainer.pilot_config.target_modules == ["q_proj", "v_proj"]
    # m0² − w0² = β = 0.5 at the start: balance (divided by the model's β) is 1, not 0.5 (β = 1 of the args)
    assert trainer.diagnostics()["balance"] == pytest.approx(1.0, abs=1e-4)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "balance" in h]
    assert logged and logged[0]["balance"] == pytest.approx(1.0, abs=0.05)
    report = trainer.sparsity_report
    assert set(report["layers"]) == names and _exactly_half(report)
    all_linear = set(find_target_layers(trainer.model))
    assert len(all_linear) > len(names)
    untouched = all_linear - names
    for name in untouched:  # the other linear layers were neither wrapped nor pruned
        assert not (trainer.model.get_submodule(name).weight == 0).any(), name
    info = trainer.card_info()
    assert set(info.sparsity_report["layers"]) == names
    card = render_model_card(info).content
    per_layer = card.split("## Per-layer sparsity", 1)[1]
    assert all(n in per_layer for n in names) and not any(n in per_layer for n in untouched)


def test_a_user_wrapped_model_is_what_the_run_settings_record(tmp_path):
    """The card and pilot_state.json record the run: with a user-wrapped model, its β and targets
    (not the arguments' defaults β = 1 and all-linear, which were not used)."""
    trainer = _user_wrapped_trainer(tmp_path, save_strategy="steps", save_steps=8)
    trainer.train()
    hyper = trainer.card_info().hyperparameters
    assert hyper.get("beta") == 0.5, hyper.get("beta")
    assert hyper.get("target_modules") == ["q_proj", "v_proj"], hyper.get("target_modules")
    state = json.loads((tmp_path / "out" / "checkpoint-8" / "pilot_state.json").read_text())
    assert (state["settings"]["beta"], state["settings"]["target_modules"]) == (0.5, ["q_proj", "v_proj"])


# ----- 3. PEFT models are refused ----------------------------------------------------------------------------

def test_peft_models_and_lora_layers_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="[Mm]erge the adapters"):
        PILoTTrainer(model=peft_model, args=make_args(tmp_path), train_dataset=arithmetic_dataset())
    assert not is_wrapped(peft_model)

    plain = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), tiny_model())
    assert type(plain).__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="[Mm]erge the adapters"):
        PILoTTrainer(model=plain, args=make_args(tmp_path), train_dataset=arithmetic_dataset())
    assert not is_wrapped(plain)


# ----- 4. warm start inside the trainer -------------------------------------------------------------------

def _effective_zero_fractions(model) -> dict[str, float]:
    return {n: float((m.merged_weight() == 0).float().mean()) for n, m in masked_layers(model).items()}


def test_wanda_warm_start_is_oneshot_prune_on_calibration_blocks(tmp_path):
    model, data = tiny_model(), arithmetic_dataset()
    reference = copy.deepcopy(model)
    args = make_args(tmp_path, warm_start="wanda", num_calibration_samples=4, sparsity=0.5, seed=3)
    trainer = PILoTTrainer(model=model, args=args, train_dataset=data)
    fractions = _effective_zero_fractions(trainer.model)
    assert fractions and all(f == 0.5 for f in fractions.values()), fractions
    assert trainer.warm_start_report.method == "wanda" and trainer.warm_start_report.num_samples == 4

    oneshot_prune(reference, calibration_blocks(data, 4, seed=3), "wanda", 0.5)
    targets = find_target_layers(reference)
    assert set(targets) == set(masked_layers(trainer.model))
    for name, layer in masked_layers(trainer.model).items():
        expected, got = targets[name].weight, layer.merged_weight()
        assert torch.equal(got == 0, expected == 0), name
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)  # m0 ⊙ (W / m0) = W up to fp32 rounding
    # another seed picks other calibration blocks: the warm start really uses args.seed
    other = oneshot_prune(copy.deepcopy(tiny_model()), calibration_blocks(data, 4, seed=4), "wanda", 0.5)
    assert any(not torch.equal(other.masks[n], trainer.warm_start_report.masks[n]) for n in other.masks)


def test_magnitude_warm_start_needs_no_training_data(tmp_path):
    trainer = PILoTTrainer(model=tiny_model(), args=make_args(tmp_path, warm_start="magnitude", sparsity=0.5))
    fractions = _effective_zero_fractions(trainer.model)
    assert fractions and all(f == 0.5 for f in fractions.values()), fractions


def test_warm_start_refusals(tmp_path):
    with pytest.raises(ValueError, match="train_dataset"):
        PILoTTrainer(model=tiny_model(), args=make_args(tmp_path, warm_start="wanda", num_calibration_samples=4))
    wrapped = wrap_model(tiny_model())
    with pytest.raises(ValueError, match="already wrapped"):
        PILoTTrainer(model=wrapped, args=make_args(tmp_path, warm_start="magnitude"),
                     train_dataset=arithmetic_dataset())
    assert all(float((m.merged_weight() == 0).float().mean()) == 0 for m in masked_layers(wrapped).values())


# ----- 5. resuming -----------------------------------------------------------------------------------------

def resume_args(tmp_path, **kw):
    return {**dict(output_dir=str(tmp_path / "run"), max_steps=16, save_strategy="steps", save_steps=4,
                   alpha_update_interval=2, sparsity=0.5), **kw}


class StartStep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, **kw):
        self.steps.append(state.global_step)


def test_resume_true_takes_the_latest_complete_checkpoint_by_number(tmp_path):
    make_trainer(tmp_path, **resume_args(tmp_path)).train()
    run = tmp_path / "run"
    assert sorted(os.listdir(run), key=lambda n: int(n.split("-")[1])) == [f"checkpoint-{s}" for s in (4, 8, 12, 16)]
    os.remove(run / "checkpoint-16" / "pilot_state.json")  # an interrupted save
    # as text: 'checkpoint-8' > 'checkpoint-12' > 'checkpoint-16'; by number 12 is the latest complete one

    resumed = make_trainer(tmp_path, **resume_args(tmp_path))
    loaded, start = [], StartStep()
    original = resumed._load_pilot_state
    resumed._load_pilot_state = lambda checkpoint: (loaded.append(str(checkpoint)), original(checkpoint))[1]
    resumed.add_callback(start)
    resumed.train(resume_from_checkpoint="true")
    assert loaded == [str(run / "checkpoint-12")] and start.steps == [12]
    assert resumed.state.global_step == 16 and _exactly_half(resumed.sparsity_report)

    shutil.rmtree(run / "checkpoint-16")
    shutil.copytree(run / "checkpoint-12", run / "checkpoint-16")
    os.remove(run / "checkpoint-16" / "pilot_state.json")
    incomplete = make_trainer(tmp_path, **resume_args(tmp_path))
    with pytest.raises(ValueError, match=r"checkpoint-16 has no pilot_state\.json.*Resume from .*checkpoint-12"):
        incomplete.train(resume_from_checkpoint=str(run / "checkpoint-16"))
    assert incomplete.state.global_step == 0

    fresh = make_trainer(tmp_path, **{**resume_args(tmp_path), "output_dir": str(tmp_path / "fresh")})
    fresh.add_callback(start)
    fresh.train(resume_from_checkpoint="False")  # the string 'false' means: start anew
    assert start.steps[-1] == 0


# ----- 6. the run settings record -------------------------------------------------------------------------

def test_run_settings_are_the_record_checkpoints_cards_and_resumes_read(tmp_path):
    first = make_trainer(tmp_path, **resume_args(tmp_path, max_steps=8))
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    state = json.loads((checkpoint / "pilot_state.json").read_text())
    assert state["settings"] == json.loads(json.dumps(first.args.run_settings()))

    info = first.card_info()
    settings = first.args.run_settings()
    assert info.method == settings["method"] == "pilot"
    for key in ("sparsity", "learning_rate", "max_steps", "sparsity_pattern", "alpha_init", "seed"):
        assert info.hyperparameters[key] == settings[key], key
    assert {k: v for k, v in settings.items() if v is not None and k != "method"} == info.hyperparameters
    assert (info.hyperparameters["max_steps"], info.hyperparameters["learning_rate"]) == (8, 1e-3)

    listing = sorted(os.listdir(tmp_path / "run"))
    other = make_trainer(tmp_path, **resume_args(tmp_path, max_steps=8), learning_rate=2e-3)
    with pytest.raises(ValueError, match=r"learning_rate: checkpoint 0\.001 vs now 0\.002"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert other.state.global_step == 0 and is_wrapped(other.model)
    assert sorted(os.listdir(tmp_path / "run")) == listing


# ----- 7. the Hub token is never pickled --------------------------------------------------------------------

def test_pickled_arguments_never_carry_the_hub_token(tmp_path):
    args = make_args(tmp_path, hub_token=TOKEN)
    assert args.hub_token == TOKEN
    data = pickle.dumps(args)
    assert TOKEN.encode() not in data
    assert args.hub_token == TOKEN  # pickling did not clear it
    assert pickle.loads(data).learning_rate == args.learning_rate

    trainer = make_trainer(tmp_path, hub_token=TOKEN, save_strategy="steps", save_steps=4)
    trainer.train()
    assert trainer.args.hub_token == TOKEN
    saved = tmp_path / "out" / "checkpoint-4" / "training_args.bin"
    assert saved.is_file() and TOKEN.encode() not in saved.read_bytes()
    loaded = torch.load(saved, weights_only=False)
    assert loaded.hub_token is None and loaded.learning_rate == 1e-3
    trainer.save_model(str(tmp_path / "final"))
    final = tmp_path / "final" / "training_args.bin"
    assert not final.exists() or TOKEN.encode() not in final.read_bytes()


def test_copies_of_the_arguments_keep_the_hub_token(tmp_path):
    """Only pickles drop the token: a copy made in memory (copy.copy / copy.deepcopy) is still the run's."""
    args = make_args(tmp_path, hub_token=TOKEN)
    assert copy.copy(args).hub_token == TOKEN
    assert copy.deepcopy(args).hub_token == TOKEN
