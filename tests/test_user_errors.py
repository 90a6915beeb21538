"""Every input a user can get wrong: exit 2, one paragraph that says what was wrong (never a traceback),
and nothing written: no output folder, no staging folder, no output file.

Each case runs in-process through `pilot_hf.commands.main` (fast). Where the mistake can be seen without the
model, loading the model is an error of its own (the check must come first)."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from helpers import error_lines, tiny_flags

from pilot_hf import data as D
from pilot_hf.commands import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files and folders a user might point pilot-hf at by mistake."""
    root = tmp_path_factory.mktemp("bad")
    (root / "binary.txt").write_bytes(b"text\x00\x01\x02 with NUL bytes\xff")
    (root / "latin1.txt").write_bytes("café, crème brûlée\n".encode("latin-1"))
    (root / "blank.txt").write_text("   \n\n\t \n")
    (root / "empty.txt").write_text("")
    (root / "data.xml").write_text("<text>hello</text>")
    (root / "syntax.yaml").write_text("sparsity: [0.5, 0.7\n")
    (root / "unknown_key.yaml").write_text("sparsity: 0.5\nlearning_rat: 1.0e-4\n")
    (root / "list.yaml").write_text("- sparsity\n- 0.5\n")
    (root / "a-file").write_text("not a folder")
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text("{}")
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32))
    bert.save_pretrained(root / "bert")
    (root / "malformed.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n{"text": "fine"}\n')
    # The user's own checkpoint-N folders (e.g. of another tool): a run must never rotate them away.
    for step in (1, 2):
        (root / "my-checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (root / "my-checkpoints" / f"checkpoint-{step}" / "notes.txt").write_text("mine")
    _broken_models(root)
    return root


def _broken_models(root):
    """Model folders a download or an editor can leave broken (a compressed checkpoint whose config.json lost its
    quantization_config, weights cut short) and a checkpoint with a file cut short."""
    import shutil

    from conftest import save_tiny_llama

    import pilot_hf
    from pilot_hf import serialization as S

    save_tiny_llama(root / "llama")
    model = T.AutoModelForCausalLM.from_pretrained(root / "llama" / "model")
    pilot_hf.magnitude_prune(model, 0.5)
    for name, drop in (("parts-without-config", ("quantization_config", "transformers_weights")),
                       ("config-lost", ("quantization_config",))):
        S.save_compressed(model, root / name, T.AutoTokenizer.from_pretrained(root / "llama" / "model"))
        config = json.loads((root / name / "config.json").read_text())
        for key in drop:
            config.pop(key, None)
        (root / name / "config.json").write_text(json.dumps(config))
    shutil.copytree(root / "llama" / "model", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    checkpoint = root / "cut-checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    for name in ("trainer_state.json", "pilot_state.json"):
        (checkpoint / name).write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(weights.read_bytes())  # cut short too


def _flags(t, out, *extra, **replace):
    """tiny_flags as strings, with `--name value` pairs replaced (replace={'train_file': ...})."""
    flags = [str(a) for a in tiny_flags(t, out)]
    for name, value in replace.items():
        flags[flags.index(f"--{name}") + 1] = str(value)
    return [*flags, *map(str, extra)]


def _oneshot(t, out, *extra):
    return ["oneshot", "--model_name_or_path", str(t / "model"), "--output_dir", str(out), "--eval_texts", "pydoc",
            "--eval_max_tokens", "512", "--eval_max_length", "64", *map(str, extra)]


def _sweep(t, out, *extra):
    return ["sweep", "--model_name_or_path", str(t / "model"), "--dataset_name", "builtin:pydoc", "--output_dir",
            str(out), "--eval_texts", "pydoc", "--eval_max_tokens", "512", "--eval_max_length", "64", "--use_cpu",
            *map(str, extra)]


# (id, argv from (tiny_dir, bad files, output_dir), what the message must say, loads the model first?)
CASES = [
    # --- training text
    ("train_file-missing", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "nope.txt")],
     "does not exist", False),
    ("train_file-binary", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "binary.txt")],
     "is binary (it contains NUL bytes)", False),
    ("train_file-not-utf8", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "latin1.txt")],
     "is not UTF-8 text", False),
    ("train_file-whitespace", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "blank.txt")],
     "only whitespace", False),
    ("train_file-empty", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "empty.txt")],
     "is empty", False),
    ("train_file-extension", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "data.xml")],
     "unsupported extension", False),
    ("dataset-unknown-builtin", lambda t, b, o: ["compress", "--model_name_or_path", str(t / "model"),
                                                 "--dataset_name", "builtin:wiki", "--output_dir", str(o)],
     "unknown built-in text 'builtin:wiki'", False),
    ("block_size-1", lambda t, b, o: ["compress", *_flags(t, o, block_size=1)], "block_size must be at least 2",
     False),
    # --- the YAML file and the flags themselves
    ("yaml-syntax", lambda t, b, o: ["compress", "--config", str(b / "syntax.yaml")], "is not valid YAML", False),
    ("yaml-unknown-key", lambda t, b, o: ["compress", "--config", str(b / "unknown_key.yaml")],
     "unknown key(s) ['learning_rat']", False),
    ("yaml-not-mapping", lambda t, b, o: ["compress", "--config", str(b / "list.yaml")],
     "expected a mapping", False),
    ("config-missing", lambda t, b, o: ["compress", "--config", str(b / "nope.yaml")], "no such file", False),
    ("unknown-flag", lambda t, b, o: ["compress", *_flags(t, o, "--frobnicate", "1")],
     "unknown argument(s) ['--frobnicate'", False),
    ("misspelled-flag", lambda t, b, o: ["compress", *_flags(t, o, "--sparsit", "0.5")],
     "unknown argument(s) ['--sparsit'", False),
    ("abbreviated-flag", lambda t, b, o: ["compress", *_flags(t, o, "--recovery", "2")],
     "unknown argument(s) ['--recovery'", False),
    ("flag-value-not-a-number", lambda t, b, o: ["compress", *_flags(t, o, max_steps="six")],
     "invalid int value: 'six'", False),
    ("flag-value-not-a-choice", lambda t, b, o: ["compress", *_flags(t, o, save_strategy="sometimes")],
     "--save_strategy/--save-strategy: invalid choice: 'sometimes'", False),
    ("config-without-a-path", lambda t, b, o: ["compress", *_flags(t, o), "--config"],
     "argument --config: expected one argument", False),
    ("unknown-command", lambda t, b, o: ["compres", *_flags(t, o)], "unknown command 'compres'", False),
    # --- sparsity and pattern
    ("compress-sparsity-1.5", lambda t, b, o: ["compress", *_flags(t, o, sparsity=1.5)],
     "strictly between 0 and 1", False),
    ("oneshot-sparsity-0", lambda t, b, o: _oneshot(t, o, "--sparsity", 0), "strictly between 0 and 1", False),
    ("oneshot-sparsity-negative", lambda t, b, o: _oneshot(t, o, "--sparsity", -1), "sparsity=-1.0", False),
    ("sparsity-0.5-with-1:4", lambda t, b, o: ["compress", *_flags(t, o, "--sparsity_pattern", "1:4")],
     "pattern 1:4 always gives sparsity 0.75; got sparsity=0.5", False),
    ("pattern-3:5-not-divisible", lambda t, b, o: ["compress", *_flags(t, o, "--sparsity_pattern", "3:5",
                                                                       sparsity=0.4)],
     "needs in_features divisible by 5", True),
    ("global-with-wanda-warm-start", lambda t, b, o: ["compress", *_flags(t, o, "--sparsity_pattern", "global",
                                                                          "--warm_start", "wanda")],
     "a wanda warm start compares scores within a layer (or row); pattern 'global' is only meaningful", False),
    ("oneshot-global-with-wanda", lambda t, b, o: _oneshot(t, o, "--method", "wanda", "--sparsity_pattern",
                                                           "global"),
     "pattern 'global' is only meaningful for magnitude", False),
    # --- methods and the PILoT settings
    ("compress-method-unknown", lambda t, b, o: ["compress", *_flags(t, o, "--method", "obs")], "method='obs'",
     False),
    ("oneshot-method-unknown", lambda t, b, o: _oneshot(t, o, "--method", "obs"), "method='obs' is not known",
     False),
    ("compress-method-dense", lambda t, b, o: ["compress", *_flags(t, o, "--method", "dense")],
     "is now called 'finetune'", False),
    ("warm_start-unknown", lambda t, b, o: ["compress", *_flags(t, o, "--warm_start", "obs")],
     "warm_start='obs'", False),
    ("max_steps-0", lambda t, b, o: ["compress", *_flags(t, o, max_steps=0)], "max_steps=0 trains nothing", False),
    ("recovery_steps-not-below-max_steps", lambda t, b, o: ["compress", *_flags(t, o, recovery_steps=6)],
     "recovery_steps=6 must be < max_steps=6", False),
    ("alpha_init-0", lambda t, b, o: ["compress", *_flags(t, o, "--alpha_init", 0)], "alpha_init=0.0", False),
    ("delta-1", lambda t, b, o: ["compress", *_flags(t, o, "--delta", 1)], "delta=1.0", False),
    ("teacher_dtype-bad", lambda t, b, o: ["compress", *_flags(t, o, "--distill_logit_weight", 1, "--teacher_dtype",
                                                               "int8")],
     "teacher_dtype='int8'", False),
    ("lm_loss_weight-0-without-distillation", lambda t, b, o: ["compress", *_flags(
        t, o, "--lm_loss_weight", 0, "--distill_logit_weight", 0, "--distill_feature_weight", 0)],
     "lm_loss_weight=0 leaves no loss", False),
    ("distill-weight-negative", lambda t, b, o: ["compress", *_flags(t, o, "--distill_feature_weight", -0.5)],
     "distill_feature_weight=-0.5", False),
    ("dtype-bad", lambda t, b, o: ["compress", *_flags(t, o, "--dtype", "int4")], "dtype='int4'", False),
    ("num_calibration_samples-above-data", lambda t, b, o: ["compress", *_flags(
        t, o, "--warm_start", "wanda", "--num_calibration_samples", 100_000, "--skip_dense_eval")],
     "num_calibration_samples=100000 exceeds the", True),
    ("oneshot-num_calibration_samples-above-data", lambda t, b, o: _oneshot(
        t, o, "--method", "wanda", "--calibration_dataset", t / "train.txt", "--calibration_seqlen", 32,
        "--num_calibration_samples", 10_000, "--skip_dense_eval"),
     "fewer than num_samples=10000", True),
    ("oneshot-calibration-file-missing", lambda t, b, o: _oneshot(t, o, "--method", "wanda", "--calibration_dataset",
                                                                  b / "nope.txt"),
     "calibration_dataset", False),
    # --- evaluation texts
    ("eval_texts-unknown", lambda t, b, o: ["compress", *_flags(t, o, eval_texts="wiki")],
     "are not built-in held-out texts", False),
    ("eval_text-not-installed", lambda t, b, o: ["compress", *_flags(t, o, eval_texts="pyguide")],
     "the built-in text 'pyguide' is not available", False),
    # --- the model
    ("model-path-missing", lambda t, b, o: ["compress", *_flags(t, o, model_name_or_path=b / "nope")],
     "does not exist", False),
    ("model-folder-without-config", lambda t, b, o: ["compress", *_flags(t, o, model_name_or_path=b / "no-config")],
     "no config.json", False),
    ("model-hub-id-offline", lambda t, b, o: ["compress", *_flags(t, o, model_name_or_path="some-org/some-model")],
     "Hub is offline", False),
    ("compress-bert", lambda t, b, o: ["compress", *_flags(t, o, model_name_or_path=b / "bert")],
     "not a causal", False),
    ("oneshot-bert", lambda t, b, o: _oneshot(t, o, "--model_name_or_path", b / "bert"), "not a causal", False),
    ("evaluate-bert", lambda t, b, o: ["evaluate", "--model_name_or_path", str(b / "bert")], "not a causal", False),
    ("evaluate-model-missing", lambda t, b, o: ["evaluate", "--model_name_or_path", str(b / "nope")],
     "does not exist", False),
    # --- where results go
    ("output_dir-is-a-file", lambda t, b, o: ["compress", *_flags(t, o, output_dir=b / "a-file")], "is a file", False),
    ("output_dir-not-writable", lambda t, b, o: ["compress", *_flags(t, o, output_dir=b / "a-file" / "out")],
     "in a folder you can write to", False),
    ("oneshot-output_dir-is-a-file", lambda t, b, o: _oneshot(t, b / "a-file"), "is a file", False),
    ("checkpoint_dir-inside-output_dir", lambda t, b, o: ["compress", *_flags(t, o, "--checkpoint_dir", o / "ck")],
     "is inside output_dir", False),
    ("resume-folder-missing", lambda t, b, o: ["compress", *_flags(t, o, "--resume_from_checkpoint", b / "nope")],
     "no such folder", False),
    ("resume-true-without-checkpoints", lambda t, b, o: ["compress", *_flags(t, o, "--resume_from_checkpoint",
                                                                             "true")],
     "holds no complete checkpoint", False),
    ("resume-not-a-checkpoint", lambda t, b, o: ["compress", *_flags(t, o, "--resume_from_checkpoint",
                                                                     b / "no-weights")],
     "is not a complete checkpoint", False),
    ("evaluate-output_file-folder-missing", lambda t, b, o: [
        "evaluate", "--model_name_or_path", str(t / "model"), "--output_file", str(o / "eval.json")],
     "does not exist; create it", False),
    ("evaluate-output_file-is-a-folder", lambda t, b, o: ["evaluate", "--model_name_or_path", str(t / "model"),
                                                          "--output_file", str(b)],
     "is a folder", False),
    # --- sweep
    ("sweep-method-unknown", lambda t, b, o: _sweep(t, o, "--methods", "obs"), "unknown method", False),
    ("sweep-sparsity-bad", lambda t, b, o: _sweep(t, o, "--sparsities", "1.5"), "strictly between 0 and 1", False),
    ("sweep-oneshot-plus-trained", lambda t, b, o: _sweep(t, o, "--methods", "wanda+pilot"), "unknown method",
     False),
    ("sweep-trained-without-max_steps", lambda t, b, o: _sweep(t, o, "--methods", "pilot", "--max_steps", -1),
     "max_steps", False),
    ("sweep-fixed-after-a-regularizer", lambda t, b, o: _sweep(t, o, "--methods", "pilot+wanda+fixed"),
     "only follows 'finetune+<", False),
    ("sweep-keep_zeros-for-every-cell", lambda t, b, o: _sweep(t, o, "--methods", "finetune+wanda", "--method",
                                                                "finetune", "--warm_start", "wanda", "--keep_zeros",
                                                                "true", "--max_steps", 4),
     "name the cells that keep a one-shot start's pattern 'finetune+<one-shot>+fixed'", False),
    # --- push
    ("push-repo_id-missing", lambda t, b, o: ["push", str(t / "model")],
     "the following arguments are required: --repo_id", False),
    ("push-repo_id-bad", lambda t, b, o: ["push", str(t / "model"), "--repo_id", "not a repo"], "is not valid",
     False),
    ("push-folder-missing", lambda t, b, o: ["push", str(b / "nope"), "--repo_id", "me/model", "--dry_run"],
     "is not a folder", False),
    ("push-folder-without-weights", lambda t, b, o: ["push", str(b / "no-weights"), "--repo_id", "me/model",
                                                     "--dry_run"],
     "model weights", False),
    # --- issue 25: a model that would load as random weights, files cut short, files that are not ours
    ("evaluate-compressed-parts-without-config", lambda t, b, o: [
        "evaluate", "--model_name_or_path", str(b / "parts-without-config")],
     "has no pilot_sparse quantization_config that describes them", False),
    ("compress-compressed-parts-without-config", lambda t, b, o: [
        "compress", *_flags(t, o, model_name_or_path=b / "parts-without-config")],
     "has no pilot_sparse quantization_config that describes them", False),
    ("evaluate-compressed-config-lost", lambda t, b, o: ["evaluate", "--model_name_or_path", str(b / "config-lost")],
     "lost its quantization_config", False),
    ("evaluate-weights-cut-short", lambda t, b, o: ["evaluate", "--model_name_or_path", str(b / "truncated")],
     "truncated or corrupted", False),
    ("oneshot-weights-cut-short", lambda t, b, o: _oneshot(t, o, "--model_name_or_path", b / "truncated"),
     "truncated or corrupted", False),
    ("evaluate-output_file-exists", lambda t, b, o: ["evaluate", "--model_name_or_path", str(t / "model"),
                                                     "--output_file", str(t / "model" / "config.json")],
     "already exists; pilot-hf evaluate never overwrites a file", False),
    ("checkpoint_dir-holds-foreign-checkpoints", lambda t, b, o: [
        "compress", *_flags(t, o, "--checkpoint_dir", b / "my-checkpoints", "--save_total_limit", 1,
                            save_strategy="steps")],
     "holds checkpoint-1, checkpoint-2, which pilot-hf did not write", False),
    ("resume-checkpoint-cut-short", lambda t, b, o: [
        "compress", *_flags(t, o, "--resume_from_checkpoint", b / "cut-checkpoints" / "checkpoint-4")],
     "model.safetensors is cut short or damaged). Start without --resume_from_checkpoint", False),
    ("train_file-malformed-jsonl", lambda t, b, o: ["compress", *_flags(t, o, train_file=b / "malformed.jsonl")],
     "line 2 is not valid JSON", False),
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the model fails the test: mistakes that can be seen without the model are reported first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    from pilot_hf import sweep
    from pilot_hf.commands import compress, evaluate, oneshot

    for module in (compress, evaluate, oneshot, sweep):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error(case, tiny_dir, bad, tmp_path, capsys, monkeypatch, request):  # noqa: F811
    name, argv, message, loads = case
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_source = D._source_text

    def source_text(name):  # as on a machine without Debian's python-doc package
        if name == "pyguide":
            raise FileNotFoundError("the Python documentation sources are not installed")
        return real_source(name)

    monkeypatch.setattr(D, "_source_text", source_text)
    if not loads:
        request.getfixturevalue("no_model_loading")
    out = tmp_path / "out"
    before = sorted(p.name for p in bad.iterdir())
    code = main(argv(tiny_dir, bad, out))
    stderr = capsys.readouterr().err
    lines = error_lines(stderr)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1, lines  # one paragraph, nothing else
    assert lines[0].startswith("pilot-hf") and message in lines[0], lines[0]
    # nothing written: no output, staging or checkpoint folder (the empty lock file may stay), nothing beside
    # the user's files
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".out.lock"])
    assert sorted(p.name for p in bad.iterdir()) == before


def test_matrix_is_large_enough():
    assert len(CASES) >= 40
    commands = {argv(Path("t"), Path("b"), Path("o"))[0] for _, argv, _, _ in CASES}
    assert commands >= {"compress", "oneshot", "evaluate", "sweep", "push"}


def test_max_steps_message_names_max_steps_only(tiny_dir, tmp_path, capsys):  # noqa: F811
    # recovery_steps=2 is set too: the message must be about max_steps, not blame recovery_steps
    assert main(["compress", *_flags(tiny_dir, tmp_path / "o", max_steps=0)]) == 2
    line = error_lines(capsys.readouterr().err)[0]
    assert "max_steps=0" in line and "recovery_steps" not in line


def test_token_given_to_a_command_without_one_is_not_echoed(tiny_dir, tmp_path, capsys):  # noqa: F811
    token = "hf_" + "Q" * 30
    code = main(_oneshot(tiny_dir, tmp_path / "o", "--hub_token", token))
    stderr = capsys.readouterr().err
    assert code == 2 and "unknown argument(s) ['--hub_token'" in stderr
    assert token not in stderr
    code = main(["compress", *_flags(tiny_dir, tmp_path / "o", "--hub-token", "plain-secret-value", "--frobnicate")])
    stderr = capsys.readouterr().err
    assert code == 2 and "--frobnicate" in stderr and "plain-secret-value" not in stderr


def test_oneshot_calibration_file_works(tiny_dir, tmp_path, capsys):  # noqa: F811
    """A calibration file that exists is used (the counterpart of 'oneshot-calibration-file-missing')."""
    out = tmp_path / "o"
    code = main(_oneshot(tiny_dir, out, "--method", "wanda", "--calibration_dataset", tiny_dir / "train.txt",
                         "--calibration_seqlen", 32, "--num_calibration_samples", 4, "--skip_dense_eval"))
    assert code == 0, capsys.readouterr().err[-3000:]
    record = json.loads((out / "run_config.json").read_text())
    assert record["settings"]["calibration_dataset"] == str(tiny_dir / "train.txt")
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean() == pytest.approx(0.5) and torch.isfinite(q).all()


def test_dashed_model_flag_is_a_given_model(tiny_dir, tmp_path):  # noqa: F811
    """--model-name-or-path is --model_name_or_path (HfArgumentParser takes both): no demo defaults are mixed in
    (they bring dataset_name, which clashed with the user's train_file)."""
    from pilot_hf.commands import command_module, parse

    argv = ["--model-name-or-path", str(tiny_dir / "model"), "--train_file", str(tiny_dir / "train.txt"),
            "--output_dir", str(tmp_path / "o")]
    model, data, *_ = parse("compress", argv, command_module("compress").ARGUMENTS)
    assert model.model_name_or_path == str(tiny_dir / "model") and data.dataset_name is None
