"""The budget study's scripts (scripts/study_cells.py, study_report.py): which cells a config asks for, and
which tune row is chosen. The real study config is read, so an edit that breaks it fails here, not hours in."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import is_study_cells_config

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    if str(ROOT / "scripts") not in sys.path:  # as when the script runs: its neighbours import by name
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_second_seed_cells_repeat_a_tuned_setting_in_seed_1():
    cells_module = _script("study_cells")
    config = cells_module.load_config(ROOT / "configs" / "study" / "part1.yaml")
    cells = cells_module.cells(config, "tune")
    keys = [cells_module.cell_key("tune", c) for c in cells]
    assert len(keys) == len(set(keys))
    seed1 = [c for c in cells if c["seed"] == 1]
    assert {(c["method"], tuple(sorted(c["settings"].items()))) for c in seed1} == {
        ("gmp", (("learning_rate", 3e-4),)), ("gmp+ham", (("ham_alpha", 10.0), ("learning_rate", 3e-4)))}
    seed0 = {(c["method"], tuple(sorted(c["settings"].items()))) for c in cells if c["seed"] == 0}
    assert all((c["method"], tuple(sorted(c["settings"].items()))) in seed0 for c in seed1)  # the same settings


def test_the_choice_is_made_on_seed_0_only():
    report = _script("study_report")
    rows = [{"method": "gmp", "seed": 0, "settings": {"learning_rate": 3e-4}, "perplexity": {"a": 10.0}},
            {"method": "gmp", "seed": 0, "settings": {"learning_rate": 1e-3}, "perplexity": {"a": 12.0}},
            {"method": "gmp", "seed": 1, "settings": {"learning_rate": 1e-3}, "perplexity": {"a": 9.0}}]
    assert report.best_settings(rows)["gmp"]["settings"] == {"learning_rate": 3e-4}


def test_test_phase_runs_budget_by_budget_with_the_chosen_settings_and_its_extra_seeds():
    cells_module = _script("study_cells")
    config = cells_module.load_config(ROOT / "configs" / "study" / "part1.yaml")
    config["test"] = {"budgets": [0.01, 0.25], "sparsities": [0.7], "methods": ["wanda", "gmp", "pilot"],
                      "chosen": {"gmp": {"learning_rate": 3e-4}}, "seeds": {"gmp": [0, 1]}}
    cells = cells_module.cells(config, "test")
    assert [(c["method"], c["budget"], c["seed"]) for c in cells] == [
        ("wanda", 0.0, 0), ("gmp", 0.01, 0), ("gmp", 0.01, 1), ("pilot", 0.01, 0),  # a whole budget first
        ("gmp", 0.25, 0), ("gmp", 0.25, 1), ("pilot", 0.25, 0)]                      # one-shot once, budget 0
    assert all(c["settings"] == {"learning_rate": 3e-4} for c in cells if c["method"] == "gmp")
    assert all(c["settings"] == {} for c in cells if c["method"] != "gmp")


def test_every_study_cells_config_loads_and_its_cells_are_distinct():
    cells_module = _script("study_cells")
    configs = [p for p in sorted((ROOT / "configs" / "study").glob("*.yaml")) if is_study_cells_config(p)]
    assert {p.name for p in configs} >= {"part1.yaml", "part1_ham_check.yaml"}
    for path in configs:
        config = cells_module.load_config(path)
        for phase in ("tune", "test") if "test" in config else ("tune",):
            keys = [cells_module.cell_key(phase, c) for c in cells_module.cells(config, phase)]
            assert keys and len(keys) == len(set(keys)), (path.name, phase)


def test_a_config_that_extends_another_takes_its_keys_and_drops_those_set_to_null():
    report = _script("study_report")
    base = report.read_config(ROOT / "configs" / "study" / "part1.yaml")
    check = report.read_config(ROOT / "configs" / "study" / "part1_ham_check.yaml")
    assert {k: check[k] for k in ("model", "data", "common", "texts", "block_size", "recovery_share")} == {
        k: base[k] for k in ("model", "data", "common", "texts", "block_size", "recovery_share")}
    assert check["name"] == "part1-ham-check" and check["tune"]["sparsity"] == 0.9 and "extends" not in check
    assert "test" not in check and "test" in base  # `test: null` dropped the base's test phase


def _cell(method, sparsity, budget, seed, **ppl):
    return {"method": method, "sparsity": sparsity, "budget": budget, "seed": seed, "perplexity": ppl}


def test_ham_is_compared_with_its_base_method_seed_by_seed_and_only_where_both_ran():
    report = _script("study_report")
    rows = [_cell("gmp", "0.7", 0.01, 0, a=10.0), _cell("gmp+ham", "0.7", 0.01, 0, a=9.0),
            _cell("gmp", "0.7", 0.01, 1, a=20.0), _cell("gmp+ham", "0.7", 0.01, 1, a=22.0),
            _cell("finetune+wanda+ham", "0.9", 0.05, 0, a=5.0)]  # its base did not run: no line
    lines = report.ham_table(rows, ["a"]).splitlines()[2:]
    assert lines == ["| gmp+ham / gmp | 0.7 @ 1% | 0 | 0.900 |", "| gmp+ham / gmp | 0.7 @ 1% | 1 | 1.100 |"]


def test_the_goal_table_sets_pilots_best_against_the_best_control_on_seed_means():
    report = _script("study_report")
    rows = [_cell("pilot", "0.7", 0.25, 0, a=80.0), _cell("pilot+wanda", "0.7", 0.25, 0, a=90.0),
            _cell("gmp", "0.7", 0.25, 0, a=100.0), _cell("gmp", "0.7", 0.25, 1, a=80.0),  # gmp's mean: 90
            _cell("finetune+sparsegpt", "0.7", 0.25, 0, a=95.0), _cell("wanda", "0.7", 0.0, 0, a=500.0),
            _cell("spred", "0.7", 0.25, 0, a=99.0),  # beside the goal, not in it
            _cell("pilot", "0.9", 0.25, 0, a=300.0), _cell("gmp", "0.9", 0.25, 0, a=200.0)]
    lines = report.goal_table(rows, ["a"]).splitlines()[2:]
    assert lines == ["| 0.7 @ 25% | a | pilot 80.00 | gmp 90.00 | 0.889 | yes | 1.100 |",
                     "| 0.9 @ 25% | a | pilot 300.00 | gmp 200.00 | 1.500 | no | – |"]


def test_a_run_can_be_limited_to_exact_methods_a_sparsity_a_seed_and_a_budget():
    cells_module = _script("study_cells")
    config = cells_module.load_config(ROOT / "configs" / "study" / "part1.yaml")
    test = cells_module.cells(config, "test")
    picked = cells_module.select(test, "pilot, gmp+ham", 0.7, 0)
    assert {c["method"] for c in picked} == {"pilot", "gmp+ham"}  # exact: 'pilot+wanda' is not 'pilot'
    assert {c["sparsity"] for c in picked} == {"0.7"} and {c["seed"] for c in picked} == {0}
    assert len(picked) == len(config["test"]["budgets"]) * 2
    assert cells_module.select(test, None, None, None) == test
    column = cells_module.select(test, "pilot", 0.9, 0, budget=0.25)
    assert [(c["sparsity"], c["budget"]) for c in column] == [("0.9", 0.25)]


def test_part2_sweep_rows_are_read_as_cells_of_their_seed_with_the_budget_in_tokens(tmp_path):
    report = _script("study_report")
    log = [{"step": 16, "alpha": 1e-4}, {"step": 32, "alpha": 0.0}]
    short = [{"method": "dense", "sparsity": "0", "time_s": 0.0, "perplexity": {"a": 10.0}},
             {"method": "wanda", "sparsity": "0.7", "time_s": 1.0, "perplexity": {"a": 50.0}},
             {"method": "pilot+kd", "sparsity": "0.7", "time_s": 9.0, "perplexity": {"a": 30.0},
              "tokens_trained": 32768, "train_log": log}]
    long = [dict(short[1]), {"method": "gmp+kd", "sparsity": "0.7", "time_s": 9.0, "perplexity": {"a": 20.0},
                             "tokens_trained": 131072}]
    other_seed = [{**long[1], "perplexity": {"a": 24.0}, "settings": {"training": {"seed": 43}}}]
    (tmp_path / "part2-32.json").write_text(json.dumps(short))
    (tmp_path / "part2-128.json").write_text(json.dumps(long))
    (tmp_path / "part2-128-seed43.json").write_text(json.dumps(other_seed))
    rows = report.part2_rows(sorted(tmp_path.glob("part2-*.json")))
    assert sorted((r["method"], r["sparsity"], r["budget"], r["seed"]) for r in rows) == [
        ("dense", "0.0", 0.0, 42), ("gmp", "0.7", 131072.0, 42), ("gmp", "0.7", 131072.0, 43),
        ("pilot", "0.7", 32768.0, 42), ("wanda", "0.7", 0.0, 42)]
    assert next(r for r in rows if r["method"] == "pilot")["steps"] == 32
    table = report.test_table(rows, ["a"], report.tokens)
    assert "| method | 0.7 @ 32,768 tokens | 0.7 @ 131,072 tokens |" in table
    assert "| wanda | 50.00 | 50.00 |" in table and "| pilot | 30.00 | – |" in table
    assert "| gmp | – | 22.00 (20.00-24.00) |" in table  # the two seeds averaged, their range beside


def test_the_diagnostics_figure_has_one_legend_entry_per_run_and_no_two_runs_look_alike(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    report = _script("study_report")
    log = [{"step": s, "alpha": 1e-4, "balance": 0.5, "l1_ratio": 0.9, "prune_damage": 0.4} for s in (10, 20)]
    rows = [{**_cell(m, sp, b, seed), "train_log": log, "steps": 20}
            for m in ("pilot", "pilot+wanda", "spred") for sp in ("0.7", "0.9") for b in (0.01, 0.25)
            for seed in (0, 1)][:-1] + [{**_cell("gmp", "0.7", 0.01, 0), "train_log": log, "steps": 20}]
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    report.plot_diagnostics(rows, tmp_path / "d.png")
    (legend,) = figures[0].legends
    assert len(legend.get_texts()) == 23  # every m ⊙ w run, gmp left out
    looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in figures[0].axes[0].lines}
    assert len(looks) == 12  # method x budget x sparsity; the seeds of one cell share a look by design


def test_cells_of_a_setting_no_longer_chosen_are_shown_apart_and_left_out_of_the_goal():
    report = _script("study_report")
    old = {**_cell("pilot", "0.7", 0.25, 0, a=80.0), "settings": {"learning_rate": 1e-3}}
    new = {**_cell("pilot", "0.7", 0.25, 0, a=95.0), "settings": {"learning_rate": 1e-3, "beta": 1e-3}}
    gmp = {**_cell("gmp", "0.7", 0.25, 0, a=90.0), "settings": {"learning_rate": 3e-4}}
    rows = report.mark_superseded([old, new, gmp], {"pilot": {"learning_rate": 1e-3, "beta": 1e-3},
                                                    "gmp": {"learning_rate": 3e-4}})
    assert [r["method"] for r in rows] == ["pilot (beta default; superseded)", "pilot", "gmp"]
    assert report.goal_table(rows, ["a"]).splitlines()[2:] == [
        "| 0.7 @ 25% | a | pilot 95.00 | gmp 90.00 | 1.056 | no | – |"]  # the old 80.00 is not PILoT's best
    assert "| pilot (beta default; superseded) | 80.00 |" in report.test_table(rows, ["a"])
    assert report.methods_in_order(rows) == ["pilot", "pilot (beta default; superseded)", "gmp"]
