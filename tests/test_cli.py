"""The CLI as a user drives it: subprocesses, exit codes, files on disk."""

import json
from dataclasses import asdict

import pytest
import torch
import yaml
from helpers import REPO, is_study_cells_config, pilot_hf, tiny_flags

from pilot_hf.commands import command_module
from pilot_hf.commands import parse as parse_args


def parse(command, argv):
    return parse_args(command, argv, command_module(command).ARGUMENTS)


def test_compress_then_evaluate(tiny_dir, tmp_path):
    out = tmp_path / "sparse"
    run = pilot_hf("compress", *tiny_flags(tiny_dir, out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"saved to: {out}" in run.stdout and "| pydoc |" in run.stdout
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "sparsity_report.json", "metrics.json",
            "run_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors and JSON only
    assert not (tmp_path / ".sparse.partial").exists()
    report = json.loads((out / "sparsity_report.json").read_text())
    assert all(layer["zeros"] == layer["numel"] // 2 for layer in report["layers"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert {"sparse", "pilot"} <= set(card.data.tags)
    assert card.data.eval_results[0].metric_value == pytest.approx(metrics["sparse"]["pydoc"]["perplexity"])
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["settings"]["sparsity"] == 0.5 and resolved["data"]["block_size"] == 32
    # the default recipe: a Wanda start, the LM loss plus distillation from the model as given; recorded, and on the card
    settings = resolved["settings"]
    assert settings["warm_start"] == "wanda" and settings["lm_loss_weight"] == 4.0
    assert settings["distill_logit_weight"] == 1.0 and settings["distill_feature_weight"] == 1.0
    assert "| `distill_logit_weight` | 1.0 |" in card.text and "| `lm_loss_weight` | 4.0 |" in card.text
    # the printed table puts the one-shot start the run began from between dense and sparse
    assert "| text | dense ppl | wanda start ppl | sparse ppl |" in run.stdout
    assert metrics["start"]["pydoc"]["perplexity"] > 0

    evaluated = pilot_hf("evaluate", "--model_name_or_path", out, "--eval_texts", "pydoc", "--eval_max_tokens", 512,
                         "--eval_max_length", 64, "--output_file", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "eval.json").read_text())["pydoc"]["perplexity"]
    assert again == pytest.approx(metrics["sparse"]["pydoc"]["perplexity"], rel=1e-6)


def test_one_shot_then_fine_tuning_with_a_fixed_mask(tiny_dir, tmp_path):
    """`--method finetune --warm_start magnitude --keep_zeros true`: the saved model's zeros are exactly those of a
    one-shot magnitude prune of the model given, and the weights that survive were trained."""
    from transformers import AutoModelForCausalLM

    from pilot_hf import find_target_layers, magnitude_prune

    out = tmp_path / "fixed"
    run = pilot_hf("compress", *tiny_flags(tiny_dir, out, "--method", "finetune", "--warm_start", "magnitude",
                                           "--keep_zeros", "true"))
    assert run.returncode == 0, run.stderr[-3000:]
    oneshot = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    magnitude_prune(oneshot, 0.5)
    trained = AutoModelForCausalLM.from_pretrained(out)
    expected, got = find_target_layers(oneshot), find_target_layers(trained)
    for name, layer in expected.items():
        assert torch.equal(got[name].weight == 0, layer.weight == 0), name
        assert not torch.equal(got[name].weight, layer.weight), name
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["keep_zeros"] is True and settings["warm_start"] == "magnitude"
    assert "pattern stayed fixed" in (out / "README.md").read_text()


def test_yaml_and_command_line_resolve_identically(tiny_dir, tmp_path):
    flags = [str(a) for a in tiny_flags(tiny_dir, tmp_path / "o")]
    pairs = {}
    i = 0
    while i < len(flags):
        key = flags[i][2:]
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            pairs[key] = yaml.safe_load(flags[i + 1])
            i += 2
        else:
            pairs[key] = True
            i += 1
    pairs["eval_texts"] = ["pydoc"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(pairs))
    from_flags = parse("compress", flags)
    from_yaml = parse("compress", ["--config", str(config)])
    assert [asdict(a) for a in from_flags] == [asdict(a) for a in from_yaml]
    # the command line overrides the file
    overridden = parse("compress", ["--config", str(config), "--sparsity", "0.7"])
    assert overridden[3].sparsity == 0.7


def _parse_defaults(command, argv):
    from pilot_hf.commands.parser import parse_command_line

    return parse_command_line(command, argv, command_module(command).ARGUMENTS)


def test_cli_with_a_model_and_the_api_get_the_same_run_settings(tiny_dir, tmp_path):
    """A user's own model on the command line, with nothing else set, runs exactly the Python API's defaults."""
    from pilot_hf import PILoTTrainingArguments

    args, command_line = _parse_defaults("compress", ["--model_name_or_path", str(tiny_dir / "model"), "--train_file",
                                                      str(tiny_dir / "train.txt"), "--output_dir", str(tmp_path / "o")])
    api = PILoTTrainingArguments(output_dir=str(tmp_path / "api"))
    assert args[3].run_settings() == api.run_settings()
    assert command_line.given == {"model_name_or_path", "train_file", "output_dir"}
    expected = {"warm_start": "wanda", "max_steps": 32, "recovery_steps": 8, "alpha_update_interval": 4,
                "learning_rate": None, "relative_learning_rate": 5e-4, "lr_scheduler_type": "constant",
                "per_device_train_batch_size": 4,
                "lm_loss_weight": 4.0, "distill_logit_weight": 1.0, "distill_feature_weight": 1.0}
    assert {k: api.run_settings()[k] for k in expected} == expected
    assert api.save_strategy == "no" and api.logging_steps == 4


def test_help_shows_the_defaults_the_run_records(capsys):
    from pilot_hf import PILoTTrainingArguments

    with pytest.raises(SystemExit) as done:
        _parse_defaults("compress", ["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    recorded = PILoTTrainingArguments(output_dir="unused").run_settings()
    shown = {}
    for key in ("max_steps", "learning_rate", "relative_learning_rate", "lr_scheduler_type",
                "per_device_train_batch_size", "warm_start",
                "distill_logit_weight", "distill_feature_weight", "mask_learning_rate",
                "alpha_init", "num_calibration_samples", "sparsity_pattern"):
        after_flag = text.split(f"--{key.replace('_', '-')} ", 1)[1]  # the flag's help entry
        shown[key] = after_flag.split("(default: ", 1)[1].split(")", 1)[0]
    assert shown == {k: str(recorded[k]) for k in shown}
    assert "(default: no)" in text.split("--save-strategy ", 1)[1][:400]  # not the demo's values, not Transformers'
    assert "a quarter of max_steps" in text and "an eighth of max_steps" in text
    lm_help = text.split("--lm-loss-weight ", 1)[1][:600]  # its default follows distillation (on: the recorded 4.0)
    assert f"Default {recorded['lm_loss_weight']:g} beside" in lm_help and "1 when both distillation weights" in lm_help
    assert "it runs the demo" in text  # the demo's own choices are named apart


def test_demo_sets_only_model_data_output_and_budget(tmp_path):
    from pilot_hf import PILoTTrainingArguments
    from pilot_hf.assets import DEMO_DEFAULTS

    assert set(DEMO_DEFAULTS) <= {"model_name_or_path", "dataset_name", "block_size", "validation_split_percentage",
                                  "output_dir", "max_steps", "num_calibration_samples", "eval_max_tokens"}
    demo = parse("compress", [])[3]
    same_budget = PILoTTrainingArguments(output_dir="unused", max_steps=demo.max_steps,
                                         num_calibration_samples=demo.num_calibration_samples)
    assert demo.run_settings() == same_budget.run_settings()  # the recipe itself is the defaults'


def test_teacher_that_does_not_fit_is_refused_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    from pilot_hf import distillation
    from pilot_hf.commands import compress, main

    monkeypatch.setattr(compress, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    params = distillation.count_parameters(str(tiny_dir / "model"))
    student = distillation.training_memory_bytes(params, 4, reparameterized=True)
    monkeypatch.setattr(distillation, "available_memory_bytes", lambda device: student + 3 * params)  # fp32 4 B, bf16 2 B
    argv = ["--model_name_or_path", tiny_dir / "model", "--train_file", tiny_dir / "train.txt", "--output_dir",
            tmp_path / "o", "--use_cpu"]
    assert main(["compress", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "distillation" in err and "--distill_logit_weight 0 --distill_feature_weight 0 " in err
    assert not (tmp_path / "o").exists()
    # with the teacher in bfloat16 it fits; with distillation off there is no teacher to check
    for flags in (["--teacher_dtype", "bfloat16"], ["--distill_logit_weight", "0", "--distill_feature_weight", "0"]):
        args = parse("compress", [*map(str, argv), *flags])[3]
        assert args.lm_loss_weight == (4.0 if args.distills else 1.0)  # the teacher off: the plain LM loss
        distillation.check_teacher_memory(str(tiny_dir / "model"), args)


@pytest.mark.parametrize("text,message", [
    ("sparsity: 0.5\nhub_token: hf_SECRETsecretSECRETsecret12: x\n", "is not valid YAML at line 2"),
    ("hub_token: 'hf_SECRETsecretSECRETsecret12\n", "is not valid YAML"),
    ("hub_token: [hf_SECRETsecretSECRETsecret12\n", "is not valid YAML"),
    ("max_steps: 32.5\nhub_token: hf_SECRETsecretSECRETsecret12\n", "max_steps takes a whole number, got 32.5"),
    ("max_steps: 32.0\n", "max_steps takes a whole number, got 32.0"),
])
def test_config_errors_never_echo_a_token_and_come_before_loading(tmp_path, monkeypatch, capsys, text, message):
    from pilot_hf.commands import compress, main

    monkeypatch.setattr(compress, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert main(["compress", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "SECRET" not in captured.err + captured.out
    assert len(captured.err.strip().splitlines()) == 1  # one paragraph


def test_demo_defaults_equal_the_demo_config():
    bare = parse("compress", [])
    from_file = parse("compress", ["--config", str(REPO / "configs" / "demo_cpu.yaml")])
    assert [asdict(a) for a in bare] == [asdict(a) for a in from_file]
    assert bare[0].model_name_or_path == "smollm2-135m" and bare[3].sparsity == 0.5


def _is_command_config(path) -> bool:
    """Configs of pilot-hf commands; not Accelerate's, nor scripts/study_cells.py's."""
    return path.parent.name != "accelerate" and not is_study_cells_config(path)


COMMAND_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if _is_command_config(p))


@pytest.mark.parametrize("config", COMMAND_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_parse(config):
    # GPU configs ask for bf16, which TrainingArguments refuses on a CPU-only machine: override just that.
    raw = yaml.safe_load(config.read_text())
    command = "sweep" if "methods" in raw else "compress"
    cpu = ["--bf16", "false", "--use_cpu", "true"] if "gpu" in config.name else []
    args = parse(command, ["--config", str(config), *cpu])
    resolved = {k: v for a in args for k, v in asdict(a).items()}
    for key, value in raw.items():
        if key not in ("bf16", "use_cpu", "report_to", "save_strategy", "lr_scheduler_type"):
            assert resolved[key] == value, key


def _error(run):
    return run.returncode, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""


@pytest.mark.parametrize("extra,message", [
    (["--sparsty", "0.5"], "unknown argument(s) ['--sparsty'"),
    (["--sparsity", "1.5"], "strictly between 0 and 1"),
    (["--sparsity_pattern", "3:5"], "always gives sparsity 0.4; got sparsity=0.5"),  # never silently changed
    (["--sparsity", "0.4", "--sparsity_pattern", "3:5"], "divisible by 5"),
    (["--method", "pilot", "--keep_zeros", "true"], "keep_zeros fine-tunes"),  # a fixed mask is finetune's
])
def test_bad_flags(tiny_dir, tmp_path, extra, message):
    run = pilot_hf("compress", *tiny_flags(tiny_dir, tmp_path / "o"), *extra)
    code, last = _error(run)
    assert code == 2 and message in last, run.stderr[-2000:]
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_bad_config_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sparsity: 0.5\nlearning_rat: 1.0e-4\n")
    code, last = _error(pilot_hf("compress", "--config", config))
    assert code == 2 and "unknown key(s) ['learning_rat']" in last


def test_existing_output_dir_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, last = _error(pilot_hf("compress", *tiny_flags(tiny_dir, out)))
    assert code == 2 and "--overwrite_output_dir" in last
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("model,message", [
    ("/does/not/exist", "does not exist"),
    ("some-org/some-model", "Hub is offline"),
])
def test_bad_model(tiny_dir, tmp_path, model, message):
    flags = tiny_flags(tiny_dir, tmp_path / "o")
    flags[1] = model
    code, last = _error(pilot_hf("compress", *flags))
    assert code == 2 and message in last
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_unwritable_output_dir(tiny_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, last = _error(pilot_hf("compress", *tiny_flags(tiny_dir, blocker / "out")))
    assert code == 2 and "Choose an --output_dir in a folder you can write to" in last


def test_failure_leaves_nothing_half_written(tiny_dir, tmp_path):
    # An evaluation text that does not exist fails after training: no output_dir, no partial folder.
    out = tmp_path / "o"
    run = pilot_hf("compress", *tiny_flags(tiny_dir, out), "--eval_texts", "nonexistent-text")
    assert run.returncode != 0
    assert not out.exists() and not (tmp_path / ".o.partial").exists()
