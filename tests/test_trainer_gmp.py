"""method='gmp': gradual magnitude pruning (Zhu & Gupta 2017) inside PILoTTrainer: the cubic schedule exactly,
pruned weights held at 0 between events, bit-identical resume, then the same recovery as every method."""

import pytest
import torch
from conftest import tiny_model
from helpers import arithmetic_dataset, make_args
from transformers import TrainerCallback

from pilot_hf import PILoTTrainer, find_target_layers


def gmp_args(tmp_path, **kw):
    return make_args(tmp_path, **{"method": "gmp", "sparsity": 0.6, "gmp_interval": 3, "max_steps": 16,
                                  "recovery_steps": 4, **kw})


def test_sparsity_follows_the_cubic_schedule_and_pruned_weights_stay_zero(tmp_path):
    trainer = PILoTTrainer(model=tiny_model("llama"), args=gmp_args(tmp_path), train_dataset=arithmetic_dataset())
    targets = find_target_layers(trainer.model)
    seen = []  # per step: (step, {layer: zero mask})

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((state.global_step, {n: (m.weight == 0).clone() for n, m in targets.items()}))

    trainer.add_callback(Probe())
    trainer.train()
    # Events at 0 + 3k < 12 (= max_steps − recovery_steps): steps 3, 6, 9; s_t = 0.6 (1 − (1 − t/12)³).
    expected = {t: 0.6 * (1 - (1 - t / 12) ** 3) for t in (3, 6, 9)}
    for step, zeros in seen:
        for name, z in zeros.items():
            last_event = max([t for t in expected if t <= step], default=None)
            if step >= 12:
                assert int(z.sum()) == round(0.6 * z.numel()), (step, name)
            elif last_event is None:
                assert int(z.sum()) == 0, (step, name)
            else:  # exactly the event's count, held until the next event whatever Adam's momentum does
                assert int(z.sum()) == round(expected[last_event] * z.numel()), (step, name)
    # Once pruned, a weight never comes back (its magnitude is 0 at every later event).
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert all(bool((after[n] | ~before[n]).all()) for n in before)
    assert trainer.sparsity_report["total"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_resume_inside_the_gradual_phase_is_bit_identical(tmp_path):
    common = dict(save_strategy="steps", save_steps=5)
    straight = PILoTTrainer(model=tiny_model("llama"), args=gmp_args(tmp_path / "a", **common),
                            train_dataset=arithmetic_dataset())
    straight.train()

    class Stop(Exception):
        pass

    class StopAt5(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 5:
                raise Stop

    first = PILoTTrainer(model=tiny_model("llama"), args=gmp_args(tmp_path / "b", **common),
                         train_dataset=arithmetic_dataset())
    first.add_callback(StopAt5())
    with pytest.raises(Stop):
        first.train()
    resumed = PILoTTrainer(model=tiny_model("llama"), args=gmp_args(tmp_path / "b", **common),
                           train_dataset=arithmetic_dataset())
    resumed.train(resume_from_checkpoint=True)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


@pytest.mark.parametrize("bad,match", [
    (dict(sparsity_pattern="2:4", sparsity=None), "N:M"),
    (dict(sparsity=0), "sparsity > 0"),
    (dict(gmp_interval=0), "gmp_interval"),
    (dict(gmp_initial_sparsity=0.7), "gmp_initial_sparsity"),
    (dict(alpha_schedule="constant"), "no regularization"),
])
def test_bad_gmp_arguments(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        gmp_args(tmp_path, **bad)


def test_keep_zeros_fine_tunes_a_sparse_model_without_losing_a_zero(tmp_path):
    """A model pruned elsewhere (zeros only, no metadata) fine-tunes with Adam and keeps exactly its zeros."""
    from pilot_hf import magnitude_prune

    model = tiny_model("llama")
    magnitude_prune(model, 0.5, "2:4")
    zeros = {n: (m.weight == 0).clone() for n, m in find_target_layers(model).items()}
    before = {n: m.weight.detach().clone() for n, m in find_target_layers(model).items()}
    args = make_args(tmp_path, method="finetune", sparsity=0, keep_zeros=True, max_steps=10, learning_rate=1e-2)
    trainer = PILoTTrainer(model=model, args=args, train_dataset=arithmetic_dataset())
    trainer.train()
    for name, layer in find_target_layers(trainer.model).items():
        assert torch.equal(layer.weight == 0, zeros[name]), name
        assert not torch.equal(layer.weight, before[name]), name  # the kept weights did train
    with pytest.raises(ValueError, match="keep_zeros"):
        make_args(tmp_path, method="pilot", keep_zeros=True)
    with pytest.raises(ValueError, match="warm start"):  # a target with no one-shot start: nothing to keep
        make_args(tmp_path, method="finetune", sparsity=0.5, keep_zeros=True)


def test_keep_zeros_after_a_warm_start_fixes_the_one_shot_pattern(tmp_path):
    """One-shot + fine-tuning with a fixed mask: the Wanda pattern of the warm start is the final pattern, exactly,
    the surviving weights train, and the card says the pattern was fixed."""
    from pilot_hf.card import card_info_for_run

    args = make_args(tmp_path, method="finetune", warm_start="wanda", sparsity=0.6, keep_zeros=True, max_steps=10,
                     learning_rate=1e-2)
    assert args.recovery_steps == 0  # the pattern never changes, so there is nothing to recover from
    trainer = PILoTTrainer(model=tiny_model("llama"), args=args, train_dataset=arithmetic_dataset())
    started = {n: m.weight.detach().clone() for n, m in find_target_layers(trainer.model).items()}
    assert all(float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.01) for w in started.values())
    trainer.train()
    for name, layer in find_target_layers(trainer.model).items():
        assert torch.equal(layer.weight == 0, started[name] == 0), name
        assert not torch.equal(layer.weight, started[name]), name
    settings = args.run_settings()
    assert "pattern stayed fixed" in card_info_for_run(settings, trainer.sparsity_report, base_model="m").method_description
    assert "could regrow" in card_info_for_run({**settings, "keep_zeros": False}, trainer.sparsity_report,
                                               base_model="m").method_description
