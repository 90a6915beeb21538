import json

import pytest
import torch

from pilot_hf import sweep as S
from pilot_hf.data import DataArguments
from pilot_hf.evaluation import EvalArguments
from pilot_hf.loading import ModelArguments
from pilot_hf.runs import OutputError
from pilot_hf.training_args import PILoTTrainingArguments


def args_for(tmp_path, model_dir, methods, **training):
    model = ModelArguments(model_name_or_path=str(model_dir / "model"))
    data = DataArguments(dataset_name="builtin:pydoc", block_size=32, validation_split_percentage=0)
    ev = EvalArguments(eval_texts=["pydoc"], eval_max_tokens=512, eval_max_length=64, skip_dense_eval=True)
    targs = PILoTTrainingArguments(**{
        "output_dir": str(tmp_path / "sweep"), "max_steps": 4, "recovery_steps": 1, "alpha_update_interval": 2,
        "num_calibration_samples": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-4,
        "lr_scheduler_type": "constant", "report_to": "none", "use_cpu": True, **training})
    return model, data, ev, targs, S.SweepArguments(methods=methods, sparsities=["0.5", "2:4"])


def test_sweep_table_plot_and_resume(tmp_path, tiny_dir, monkeypatch):  # noqa: F811 (pytest fixture)
    results = S.sweep(*args_for(tmp_path, tiny_dir, ["dense", "magnitude", "wanda", "pilot", "finetune+wanda"]))
    assert len(results) == 1 + 4 * 2
    out = tmp_path / "sweep"
    for name in ("results.json", "results.csv", "results.md", "perplexity_vs_sparsity.png", "sweep_config.json"):
        assert (out / name).is_file(), name
    by_cell = {(r["method"], r["sparsity"]): r for r in results}
    assert by_cell[("magnitude", "0.5")]["actual_sparsity"] == 0.5
    assert by_cell[("wanda", "2:4")]["actual_sparsity"] == 0.5
    assert by_cell[("finetune+wanda", "2:4")]["actual_sparsity"] == 0.5
    assert by_cell[("pilot", "2:4")]["tokens_trained"] == 4 * 4 * 32
    assert by_cell[("dense", "0")]["actual_sparsity"] == 0.0
    # A cell records the same run settings record as run_config.json and the card (method, warm start, budget).
    training = by_cell[("finetune+wanda", "0.5")]["settings"]["training"]
    assert training["method"] == "finetune" and training["warm_start"] == "wanda" and training["max_steps"] == 4
    assert by_cell[("finetune+wanda", "0.5")]["learning_rate"] == 1e-4  # the rate the cell trained with

    # Interrupted sweep: drop one finished cell, rerun with one more method: only the missing cells run.
    stored = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps([r for r in stored if r["method"] != "wanda"]))
    calls = []
    real = S.run_cell
    monkeypatch.setattr(S, "run_cell", lambda base, tok, m, s, *a: calls.append((str(m), s)) or real(base, tok, m, s, *a))
    S.sweep(*args_for(tmp_path, tiny_dir, ["dense", "magnitude", "wanda", "pilot", "sparsegpt"]))
    assert sorted(calls) == [("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("wanda", "0.5"), ("wanda", "2:4")]

    # Resuming with another training budget must not mix settings: trained cells refuse, nothing is written...
    before = (out / "results.json").read_bytes()
    with pytest.raises(OutputError, match=r"pilot at 0.5 computed with other settings \(training.learning_rate"):
        S.sweep(*args_for(tmp_path, tiny_dir, ["dense", "magnitude", "wanda", "pilot"], learning_rate=1e-3))
    assert (out / "results.json").read_bytes() == before
    # ... while cells that do not depend on it are reused as they are.
    calls.clear()
    S.sweep(*args_for(tmp_path, tiny_dir, ["dense", "magnitude", "wanda"], learning_rate=1e-3))
    assert calls == []


def test_fixed_cell_keeps_the_one_shot_pattern(tmp_path, tiny_dir, monkeypatch):  # noqa: F811 (pytest fixture)
    """'finetune+wanda+fixed' fine-tunes with Wanda's zeros held (keep_zeros, no recovery phase); the plain
    'finetune+wanda' cell beside it still lets them regrow and prunes at the end."""
    weights = []
    real = S.evaluate_model
    monkeypatch.setattr(S, "evaluate_model", lambda model, *a: weights.append(
        {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}) or real(model, *a))
    model, data, ev, targs, _ = args_for(tmp_path, tiny_dir, [], learning_rate=1e-2)
    grid = S.SweepArguments(methods=["wanda", "finetune+wanda+fixed", "finetune+wanda"], sparsities=["0.5"])
    by_cell = {r["method"]: r for r in S.sweep(model, data, ev, targs, grid)}
    oneshot, fixed = weights[0], weights[1]
    for name, w in oneshot.items():
        assert torch.equal(fixed[name] == 0, w == 0), name  # exactly Wanda's zeros, no more, no fewer
    assert any(not torch.equal(fixed[n], w) for n, w in oneshot.items())  # the kept weights trained
    fixed_run = by_cell["finetune+wanda+fixed"]["settings"]["training"]
    regrowing = by_cell["finetune+wanda"]["settings"]["training"]
    assert (fixed_run["keep_zeros"], fixed_run["recovery_steps"]) == (True, 0)
    assert (regrowing["keep_zeros"], regrowing["recovery_steps"]) == (False, 1)
    assert by_cell["finetune+wanda+fixed"]["actual_sparsity"] == 0.5


def test_bad_sweep_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        S.SweepArguments(methods=["obs"])
    with pytest.raises(ValueError, match="unknown method"):
        S.SweepArguments(methods=["wanda+pilot"])
    for name in ("finetune+sparsegpt+fixed", "finetune+wanda+fixed+ham+kd"):
        assert str(S.MethodSpec.parse(name)) == name and S.MethodSpec.parse(name).fixed
    for bad in ("pilot+wanda+fixed", "finetune+fixed", "gmp+fixed"):
        with pytest.raises(ValueError, match=r"only follows 'finetune\+<"):
            S.SweepArguments(methods=[bad])
    with pytest.raises(ValueError, match="unknown method"):
        S.SweepArguments(methods=["finetune+wanda+ham+fixed"])  # suffixes in their order
    with pytest.raises(ValueError, match="0 < N < M"):
        S.SweepArguments(sparsities=["4:2"])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        S.SweepArguments(sparsities=["1.5"])


def test_tables_without_matplotlib(tmp_path, monkeypatch, caplog):
    """The figure is an optional extra: without matplotlib the tables are still written, and a note says why."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    cells = [{"method": "wanda", "sparsity": "0.5", "pattern": "unstructured", "actual_sparsity": 0.5,
              "time_s": 1.0, "perplexity": {"pydoc": 12.5}}]
    S.write_tables(cells, tmp_path)
    assert (tmp_path / "results.csv").read_text().splitlines()[1].startswith("wanda,0.5,0.5000,12.500")
    assert not (tmp_path / "perplexity_vs_sparsity.png").exists()
    assert "pilot-hf[plot]" in caplog.text


def test_cell_recovery_follows_the_cell_unless_given(tmp_path):
    """A cell's recovery phase is its own default (a quarter of the budget; none for a fixed mask, which has no
    final prune) unless the shared arguments set another value, which every cell then keeps."""
    def recovery(method, **shared):
        targs = PILoTTrainingArguments(output_dir=str(tmp_path), max_steps=8, use_cpu=True, report_to="none", **shared)
        return S.cell_arguments(targs, S.MethodSpec.parse(method), "0.5", str(tmp_path / "cell")).recovery_steps
    assert (recovery("finetune+wanda"), recovery("finetune+wanda+fixed"), recovery("pilot")) == (2, 0, 2)
    assert (recovery("finetune+wanda", recovery_steps=3), recovery("finetune+wanda+fixed", recovery_steps=3)) == (3, 3)
