"""PILoTTrainer with distillation from the dense teacher (docs/METHOD.md section 10): every method, logged terms,
gradient accumulation, resume, and the teacher kept out of optimizer, checkpoints and result."""

import pytest
import torch
from conftest import tiny_model
from helpers import arithmetic_dataset, make_args
from safetensors.torch import load_file
from transformers import Trainer

from pilot_hf import PILoTTrainer, PILoTTrainingArguments
from pilot_hf.distillation import distillation_loss
from pilot_hf.sweep import SweepArguments, cell_arguments


def distill_trainer(tmp_path, model=None, **kw):
    args = make_args(tmp_path, **{"distill_logit_weight": 1.0, "distill_feature_weight": 1.0, **kw})
    return PILoTTrainer(model=model or tiny_model("llama"), args=args, train_dataset=arithmetic_dataset())


def test_lm_loss_weight_defaults_to_the_recipe_with_a_teacher_and_to_1_without():
    """Turning distillation off gives the plain LM loss, not 4x it (which would weaken the coupled regularization
    4x against it); a given weight is kept; a copy that turns distillation off or on re-follows the default."""
    off = dict(distill_logit_weight=0.0, distill_feature_weight=0.0)
    on = dict(distill_logit_weight=1.0, distill_feature_weight=1.0)
    args = lambda **kw: PILoTTrainingArguments(output_dir="unused", use_cpu=True, report_to=[], **kw)  # noqa: E731
    assert args().lm_loss_weight == 4.0 and args(**off).lm_loss_weight == 1.0
    assert args(distill_feature_weight=0.0).lm_loss_weight == 4.0  # logit distillation alone still distils
    assert args(**off, lm_loss_weight=2.5).lm_loss_weight == 2.5 and args(lm_loss_weight=0.0).lm_loss_weight == 0.0
    assert args().with_method("gmp", **off).lm_loss_weight == 1.0
    assert args(**off).with_method("pilot", **on).lm_loss_weight == 4.0
    assert args(lm_loss_weight=2.5).with_method("gmp", **off).lm_loss_weight == 2.5


@pytest.mark.parametrize("method", ["pilot", "spred", "l1", "finetune"])
def test_every_method_distils_and_logs_each_term(tmp_path, method):
    trainer = distill_trainer(tmp_path, method=method, max_steps=10, logging_steps=5, sparsity=0.5, recovery_steps=3)
    teacher = list(trainer.teacher.model.parameters())  # held, so that their ids stay theirs
    teacher_params = {id(p) for p in teacher}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"lm_loss", "logit_loss", "feature_loss"} <= set(h) for h in logged)
    # The teacher never reaches the optimizer (nor the student's parameters, hence no checkpoint or result).
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not teacher_params & optimized
    assert not teacher_params & {id(p) for p in trainer.model.parameters()}
    assert trainer.teacher is None  # released at the end
    assert trainer.sparsity_report["total"]["sparsity"] == 0.5


def test_distillation_terms_start_at_zero_and_pure_distillation_reduces_them(tmp_path):
    """The wrapped student computes the teacher's function at step 0 (PILoT init), so both terms start at ~0; a
    warm-started (pruned) student trained on distillation alone moves back towards the teacher."""
    trainer = distill_trainer(tmp_path, max_steps=1, sparsity=0.5)
    batch = {k: torch.tensor(v) for k, v in arithmetic_dataset(8)[:8].items()}
    trainer.model.train()
    trainer._distillation_loss(trainer.model, batch, None)
    assert trainer._term_sums["logit_loss"] < 1e-6 and trainer._term_sums["feature_loss"] < 1e-6

    trainer = distill_trainer(tmp_path / "kd", warm_start="magnitude", lm_loss_weight=0.0, max_steps=30,
                              logging_steps=5, learning_rate=3e-3, mask_learning_rate=3e-3, alpha_init=1e-6,
                              sparsity=0.5, recovery_steps=5)
    trainer.train()
    logit = [h["logit_loss"] for h in trainer.state.log_history if "logit_loss" in h]
    feature = [h["feature_loss"] for h in trainer.state.log_history if "feature_loss" in h]
    assert logit[0] > 0 and logit[-1] < 0.7 * logit[0], logit
    assert feature[-1] < 0.7 * feature[0], feature


def test_pure_distillation_computes_no_lm_loss_but_logs_it(tmp_path):
    """lm_loss_weight=0: the student runs without labels (no LM loss and no (N, V) log-softmax for its backward),
    the loss is the distillation terms alone, and the logged lm_loss is still the model's cross-entropy."""
    trainer = distill_trainer(tmp_path, warm_start="magnitude", lm_loss_weight=0.0, max_steps=1, sparsity=0.5)
    batch = {k: torch.tensor(v) for k, v in arithmetic_dataset(8)[:8].items()}
    trainer.model.train()
    loss, outputs = trainer._distillation_loss(trainer.model, batch, None)
    assert outputs.loss is None
    with torch.no_grad():
        expected_lm = trainer.model(**batch).loss
        teacher_logits, teacher_hidden = trainer.teacher(batch["input_ids"], batch.get("attention_mask"), True)
    expected = distillation_loss(outputs, teacher_logits, teacher_hidden, batch["labels"], logit_weight=1.0,
                                 feature_weight=1.0)["loss"]
    torch.testing.assert_close(loss, expected)
    assert trainer._term_sums["lm_loss"] == pytest.approx(float(expected_lm), rel=1e-5)
    assert float(expected_lm) > 0.1  # a pruned student: a real loss, not a degenerate 0


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """8 samples as one batch or as 2 x 4 accumulated: the same update (the distillation terms get the same
    share of the accumulated batch as the LM loss)."""
    common = dict(max_steps=3, sparsity=0.5, learning_rate=1e-3, optim="sgd", mask_learning_rate=None,
                  max_grad_norm=0.0, lr_scheduler_type="constant")
    runs = []
    for name, batch, accumulation in (("full", 8, 1), ("accumulated", 4, 2)):
        args = make_args(tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         distill_logit_weight=1.0, distill_feature_weight=0.5, **common)
        trainer = PILoTTrainer(model=tiny_model("llama"), args=args, train_dataset=arithmetic_dataset(n=8 * 3))
        trainer.train()
        runs.append(trainer.model.state_dict())
    for name, tensor in runs[0].items():
        torch.testing.assert_close(tensor, runs[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_lm_loss_in_the_logit_pass_gives_the_same_run_as_the_models_own(tmp_path, monkeypatch, accumulation):
    """The LM loss computed in the logit term's pass (the default for the plain causal-LM loss) and the one the
    model computes (a custom loss takes that path) give the same training run and the same logged terms,
    with and without gradient accumulation (where the LM loss is normalized over the accumulated batch)."""
    common = dict(max_steps=3, sparsity=0.5, learning_rate=1e-3, optim="sgd", mask_learning_rate=None,
                  max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, distill_logit_weight=0.7,
                  distill_feature_weight=0.5, lm_loss_weight=1.5, distill_temperature=2.0,
                  per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(PILoTTrainer, "_plain_lm_loss", lambda self, model, fused=fused: fused)
        trainer = PILoTTrainer(model=tiny_model("llama"), args=make_args(tmp_path / str(fused), **common),
                               train_dataset=arithmetic_dataset(n=8 * 3))
        calls = []  # the model computes its LM loss only through Trainer.compute_loss

        def counted(*args, real=Trainer.compute_loss, calls=calls, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(Trainer, "compute_loss", counted)
        trainer.train()
        monkeypatch.undo()
        assert bool(calls) != fused
        runs.append((trainer.model.state_dict(), [h for h in trainer.state.log_history if "loss" in h]))
    (fused_state, fused_logs), (model_state, model_logs) = runs
    for name, tensor in fused_state.items():
        torch.testing.assert_close(tensor, model_state[name], rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(fused_logs, model_logs, strict=True):
        for key in ("loss", "lm_loss", "logit_loss", "feature_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_the_plain_causal_lm_loss_is_recognized(tmp_path):
    trainer = distill_trainer(tmp_path, max_steps=1)
    assert trainer._plain_lm_loss(trainer.model)
    trainer.model.loss_function = lambda *a, **k: None  # a model with its own loss
    assert not trainer._plain_lm_loss(trainer.model)


def test_resume_with_distillation_is_bit_identical(tmp_path):
    common = dict(max_steps=8, sparsity=0.5, recovery_steps=3, save_strategy="steps", save_steps=4,
                  distill_logit_weight=1.0, warm_start="magnitude")
    straight = PILoTTrainer(model=tiny_model("llama"), args=make_args(tmp_path / "a", **common),
                            train_dataset=arithmetic_dataset())
    straight.train()
    first = PILoTTrainer(model=tiny_model("llama"), args=make_args(tmp_path / "b", **{**common, "max_steps": 8}),
                         train_dataset=arithmetic_dataset())

    class Stop(Exception):
        pass

    from transformers import TrainerCallback

    class StopAfter4(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise Stop

    first.add_callback(StopAfter4())
    with pytest.raises(Stop):
        first.train()
    resumed = PILoTTrainer(model=tiny_model("llama"), args=make_args(tmp_path / "b", **common),
                           train_dataset=arithmetic_dataset())
    resumed.train(resume_from_checkpoint="true")
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    # The checkpoint holds the student only: the same tensors as a run without a teacher.
    plain = PILoTTrainer(model=tiny_model("llama"), args=make_args(tmp_path / "c", **{**common,
                         "distill_logit_weight": 0.0}), train_dataset=arithmetic_dataset())
    plain.train()
    with_teacher = load_file(tmp_path / "b" / "out" / "checkpoint-4" / "model.safetensors")
    without = load_file(tmp_path / "c" / "out" / "checkpoint-4" / "model.safetensors")
    assert set(with_teacher) == set(without)
    assert not (tmp_path / "b" / "out" / "checkpoint-4" / "teacher").exists()


def test_bf16_and_gradient_checkpointing(tmp_path):
    trainer = distill_trainer(tmp_path, bf16=True, activation_checkpointing=True, teacher_dtype="bfloat16",
                              max_steps=4, logging_steps=2, sparsity=0.5)
    assert trainer.teacher.dtype == torch.bfloat16
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_teacher_by_path_must_share_the_vocabulary(tmp_path):
    other = tiny_model("gpt2")  # vocabulary 128 too, but 2 blocks of another family: logits fit
    other.save_pretrained(tmp_path / "teacher")
    trainer = distill_trainer(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"),
                              distill_feature_weight=0.0, max_steps=2)
    trainer.train()
    import transformers as T

    big = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="vocab"):
        distill_trainer(tmp_path, teacher_model_name_or_path=str(tmp_path / "big"))


def test_sweep_cells_with_and_without_distillation(tmp_path):
    grid = SweepArguments(methods=["pilot+wanda", "pilot+wanda+kd", "finetune+kd"], sparsities=["0.5"])
    base = make_args(tmp_path)
    plain, kd, finetune_kd = (cell_arguments(base, spec, "0.5", str(tmp_path)) for spec in grid.specs)
    assert not plain.distills and kd.distills and kd.distill_logit_weight == 1.0 and kd.warm_start == "wanda"
    assert finetune_kd.method == "finetune" and finetune_kd.distills
    recipe = make_args(tmp_path, distill_logit_weight=0.5, distill_feature_weight=2.0)
    assert cell_arguments(recipe, grid.specs[1], "0.5", "x").distill_feature_weight == 2.0
    assert not cell_arguments(recipe, grid.specs[0], "0.5", "x").distills
