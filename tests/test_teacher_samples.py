"""Distillation on the teacher's own text (teacher_sample_share): the split, the sampling, the mixture, the CLI."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from helpers import arithmetic_dataset, make_args, pilot_hf, tiny_flags
from torch import nn

from pilot_hf import PILoTTrainer
from pilot_hf.data import teacher_sample_split
from pilot_hf.distillation import Teacher
from pilot_hf.sweep import SweepArguments, cell_arguments

KD = dict(lm_loss_weight=0.0, distill_logit_weight=1.0, distill_feature_weight=1.0)


@pytest.mark.parametrize("text, seen, share, expected", [
    (1000, 128, 0.25, (96, 32)),  # the run sees fewer blocks than the text has: a subset of it, one pass
    (1000, 128, 1.0, (0, 128)),  # teacher text only
    (10, 128, 0.5, (10, 10)),  # little text: all of it, and teacher blocks in proportion
    (30, 128, 0.25, (30, 10)),
])
def test_split_gives_the_teacher_its_share_of_what_the_run_sees(text, seen, share, expected):
    keep, count = teacher_sample_split(text, seen, share)
    assert (keep, count) == expected
    assert count / (keep + count) == pytest.approx(share, abs=0.02)


def two_token_model():
    """A tiny Llama whose next-token distribution is, whatever the context, 1/2 token 7 and 1/2 token 9."""
    model = tiny_model("llama")
    head = nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-50.0)
        head.bias[[7, 9]] = 0.0
    model.lm_head = head
    return model


def test_samples_follow_the_teachers_distribution_seeded_and_leave_the_random_state_alone():
    teacher = Teacher.from_model(two_token_model())
    state = torch.random.get_rng_state()
    blocks = teacher.sample(6, 24, start_token_id=2, seed=3, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(blocks) == 6 and all(len(b) == 24 and b[0] == 2 for b in blocks)
    written = [t for b in blocks for t in b[1:]]
    assert set(written) == {7, 9}  # the full distribution: neither greedy nor cut to one token
    assert 0.35 < written.count(7) / len(written) < 0.65
    assert teacher.sample(6, 24, start_token_id=2, seed=3, batch_size=4) == blocks
    assert teacher.sample(6, 24, start_token_id=2, seed=4) != blocks


def test_trainer_mixes_the_teachers_text_into_what_the_run_sees_and_trains_on_it(tmp_path):
    text = arithmetic_dataset(64)
    args = make_args(tmp_path, **KD, teacher_sample_share=0.5, max_steps=4, per_device_train_batch_size=8,
                     sparsity=0.5, warm_start="magnitude", learning_rate=1e-3)
    trainer = PILoTTrainer(model=two_token_model(), args=args, train_dataset=text)
    mixed = trainer.train_dataset
    assert len(mixed) == 32  # 4 steps x 8 blocks: one pass over 16 text blocks and 16 written by the teacher
    originals = {tuple(r) for r in text["input_ids"]}
    rows = [tuple(r) for r in mixed["input_ids"]]
    assert sum(r in originals for r in rows) == 16 and len(set(rows) & originals) == 16
    written = [r for r in rows if r not in originals]
    assert all(r[0] == 2 and set(r[1:]) <= {7, 9} for r in written)  # the teacher's text, from the EOS token
    assert mixed["labels"] == mixed["input_ids"] and set(mixed.column_names) == set(text.column_names)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.sparsity_report["total"]["sparsity"] == 0.5
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert trainer.args.run_settings()["teacher_sample_share"] == 0.5


def test_data_the_samples_cannot_mix_into_is_refused_before_the_teacher_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(Teacher, "sample", lambda *a, **k: pytest.fail("sampled before checking the data"))
    text = arithmetic_dataset(16).add_column("text", ["2 + 2"] * 16)
    args = make_args(tmp_path, **KD, teacher_sample_share=0.5, max_steps=2, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match=r"packed blocks .*the columns \['input_ids', 'labels', 'text'"
                                         r"\]\. Pass packed blocks or teacher_sample_share=0"):
        PILoTTrainer(model=two_token_model(), args=args, train_dataset=text)


@pytest.mark.parametrize("settings, message", [
    (dict(teacher_sample_share=1.5), "must be in \\[0, 1\\]"),
    (dict(teacher_sample_share=0.5, lm_loss_weight=1.0, distill_logit_weight=0.0, distill_feature_weight=0.0),
     "samples text from the distillation teacher"),
    (dict(teacher_sample_share=0.5, max_steps=-1, num_train_epochs=1), "give max_steps"),
])
def test_bad_teacher_sample_settings_are_refused_with_the_fix(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **{**KD, **settings})


def test_cli_flag_records_the_share_and_the_run_samples(tiny_dir, tmp_path):
    out = tmp_path / "sparse"
    run = pilot_hf("compress", *tiny_flags(tiny_dir, out, "--teacher_sample_share", 0.25))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "from the teacher" in run.stderr  # the sampling is logged, with its count and time
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["teacher_sample_share"] == 0.25 and settings["distill_logit_weight"] == 1.0


def test_sweep_cells_mix_teacher_text_only_where_they_distil(tmp_path):
    grid = SweepArguments(methods=["pilot+wanda", "pilot+wanda+kd"], sparsities=["0.5"])
    recipe = make_args(tmp_path, **KD, teacher_sample_share=0.25)
    plain, kd = (cell_arguments(recipe, spec, "0.5", str(tmp_path)) for spec in grid.specs)
    assert plain.teacher_sample_share == 0.0 and not plain.distills
    assert kd.teacher_sample_share == 0.25 and kd.distills
