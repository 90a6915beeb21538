"""The life of a run, end to end (issue 11, "Nothing lost, nothing leaked"): tokens never reach a file, output
folders are never half-written and never someone else's, killed runs resume to the same bits, and a trained
model is never thrown away."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, pilot_hf, tiny_flags
from safetensors.torch import load_file

from pilot_hf.commands import main
from pilot_hf.naming import redact_argv
from pilot_hf.runs import MARKER_NAME, OutputError, OutputFolder, latest_checkpoint

# `pilot-hf` with every training step slowed by argv[1] seconds (numerics unchanged), so a test can send a
# signal between two checkpoints without racing a run that takes a fraction of a second.
SLOW_CLI = """
import sys, time
from pilot_hf import trainer
step = trainer.PILoTTrainer.training_step
def slow(self, *args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return step(self, *args, **kwargs)
trainer.PILoTTrainer.training_step = slow
from pilot_hf.commands import main
sys.exit(main(sys.argv[2:]))
"""


def _flags(t, out, *extra, **replace):
    flags = [str(a) for a in tiny_flags(t, out)]
    for name, value in replace.items():
        flags[flags.index(f"--{name}") + 1] = str(value)
    return [*flags, *map(str, extra)]


def resume_flags(t, out, *extra):
    """8 steps, checkpoints every 2; pruning after step 5, so checkpoint-6 lies inside the recovery phase."""
    return _flags(t, out, "--save_steps", 2, "--skip_dense_eval", *extra, max_steps=8, recovery_steps=3,
                  save_strategy="steps")


def start_slow(args, log: Path, seconds_per_step: float = 0.4) -> subprocess.Popen:
    """`pilot-hf compress *args` in the background, every training step slowed (output into `log`)."""
    with open(log, "w") as f:  # a file, not a pipe: progress bars would fill a pipe and block the run
        return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(seconds_per_step), "compress", *map(str, args)],
                                stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=REPO, preexec_fn=_sigint_default)


def _sigint_default() -> None:
    """Ctrl-C as in a user's terminal: a suite started in the background of a non-interactive shell passes SIGINT
    on ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the awaited moment:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def complete(checkpoint: Path):
    return lambda: (checkpoint / "pilot_state.json").is_file()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):  # noqa: F811
    """An uninterrupted run with checkpoints every 2 steps: the result every resumed run must equal."""
    root = tmp_path_factory.mktemp("reference")
    run = pilot_hf("compress", *resume_flags(tiny_dir, root / "ref"))
    assert run.returncode == 0, run.stderr[-3000:]
    return root, run


# ----- 1. tokens are never written -------------------------------------------------------------------------

def _token(tag: str) -> str:
    import random
    import string

    return "hf_" + tag + "".join(random.choices(string.ascii_letters, k=30 - len(tag)))


def test_redact_argv():
    token = _token("A")
    assert redact_argv(["--hub_token", "plain-secret", "--sparsity", "0.5"]) == \
        ["--hub_token", "<redacted>", "--sparsity", "0.5"]
    assert redact_argv(["--hub_token=plain-secret"]) == ["--hub_token=<redacted>"]
    assert redact_argv(["--hub-token", "plain-secret"]) == ["--hub-token", "<redacted>"]  # argparse takes it too
    assert redact_argv(["--token", "plain-secret"]) == ["--token", "<redacted>"]
    assert redact_argv(["--output_dir", f"/runs/{token}/out"]) == ["--output_dir", "/runs/<redacted>/out"]
    assert redact_argv(["--revision", token]) == ["--revision", "<redacted>"]
    assert redact_argv(["--hub_token"]) == ["--hub_token"]  # a flag without its value
    plain = ["--model_name_or_path", "org/model", "--learning_rate", "1e-4", "--hub_model_id", "me/x"]
    assert redact_argv(plain) == plain


@pytest.mark.parametrize("route", ["flag", "yaml"])
def test_token_is_never_written(tiny_dir, tmp_path, route):  # noqa: F811
    """A token on the command line or in the YAML file, plus HF_TOKEN in the environment: no file of the result
    or of the checkpoints (training_args.bin included, read as bytes) and no output line holds it."""
    given, from_env = _token("G"), _token("E")
    out = tmp_path / "o"
    if route == "yaml":
        config = tmp_path / "run.yaml"
        config.write_text(f"hub_token: {given}\n")
        where = ["--config", config]
    else:
        where = ["--hub_token", given]
    run = pilot_hf("compress", *_flags(tiny_dir, out, "--save_steps", 2, *where, save_strategy="steps"),
                   env={**ENV, "HF_TOKEN": from_env})
    assert run.returncode == 0, run.stderr[-3000:]
    written = files_under(out, tmp_path / "o-checkpoints")
    assert any(p.name == "training_args.bin" for p in written) and (out / "run_config.json") in written
    for path in written:
        data = path.read_bytes()
        for token in (given, from_env):
            assert token.encode() not in data, f"{token[:5]}... in {path}"
    for token in (given, from_env):
        assert token not in run.stdout and token not in run.stderr
    if route == "flag":
        assert "--hub_token <redacted>" in json.loads((out / "run_config.json").read_text())["command"]


def test_oneshot_writes_no_token(tiny_dir, tmp_path):  # noqa: F811
    from_env, in_argv = _token("E"), _token("V")
    out = tmp_path / "o"
    run = pilot_hf("oneshot", "--model_name_or_path", tiny_dir / "model", "--method", "magnitude", "--output_dir",
                   out, "--revision", in_argv, "--eval_texts", "pydoc", "--eval_max_tokens", 512,
                   "--eval_max_length", 64, env={**ENV, "HF_TOKEN": from_env})
    assert run.returncode == 0, run.stderr[-3000:]
    for path in files_under(out):
        assert from_env.encode() not in path.read_bytes(), path
    assert from_env not in run.stdout + run.stderr
    command = json.loads((out / "run_config.json").read_text())["command"]
    assert in_argv not in command and "--revision <redacted>" in command
    assert in_argv not in (out / "README.md").read_text()


# ----- 2. the output folder ----------------------------------------------------------------------------------

def _fake_result(folder: Path, text: str) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text(text)


def test_file_dropped_into_output_dir_during_the_run_is_kept(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(OutputError, match=r"created or changed while this run worked.*complete in .*\.result\.partial"):
        with OutputFolder(out) as folder:
            _fake_result(folder.staging, "new")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    assert (folder.staging / "model.safetensors").read_text() == "new"  # the result waits in staging


def test_overwrite_replaces_only_the_result_it_saw(tmp_path):
    out = tmp_path / "result"
    with OutputFolder(out) as folder:
        _fake_result(folder.staging, "old")
    # --overwrite_output_dir replaces an earlier pilot-hf result...
    with OutputFolder(out, overwrite=True) as folder:
        _fake_result(folder.staging, "new")
    assert (out / "model.safetensors").read_text() == "new" and (out / MARKER_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".result.lock", "result"]  # no .partial, no .replaced
    # ... but not once someone put a file of their own into it during the run
    with pytest.raises(OutputError, match="changed while this run worked"):
        with OutputFolder(out, overwrite=True) as folder:
            _fake_result(folder.staging, "newer")
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_text() == "new"
    assert (folder.staging / "model.safetensors").read_text() == "newer"


def test_overwrite_never_replaces_a_folder_pilot_hf_did_not_write(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    assert main(["compress", *_flags(tiny_dir, out, "--overwrite_output_dir")]) == 2
    assert "was not written by pilot-hf" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("command", ["compress", "oneshot"])
def test_output_dir_dot_is_refused(tiny_dir, tmp_path, monkeypatch, capsys, command):  # noqa: F811
    (tmp_path / "data.txt").write_text("precious")
    (tmp_path / MARKER_NAME).write_text("{}")  # even a folder that looks like a pilot-hf result
    monkeypatch.chdir(tmp_path)
    argv = _flags(tiny_dir, ".", "--overwrite_output_dir") if command == "compress" else [
        "--model_name_or_path", str(tiny_dir / "model"), "--output_dir", ".", "--overwrite_output_dir"]
    assert main([command, *argv]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER_NAME, "data.txt"]


@pytest.mark.parametrize("command", ["compress", "oneshot", "sweep"])
def test_output_dir_that_is_a_file_fails_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                                  command):
    from pilot_hf import sweep
    from pilot_hf.commands import compress, oneshot

    for module in (compress, oneshot, sweep):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    target = tmp_path / "results"
    target.write_text("a file")
    argv = {"compress": _flags(tiny_dir, target),
            "oneshot": ["--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(target)],
            "sweep": ["--model_name_or_path", str(tiny_dir / "model"), "--dataset_name", "builtin:pydoc",
                      "--methods", "magnitude", "--output_dir", str(target)]}[command]
    assert main([command, *argv]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "a file"


def test_second_run_into_the_same_folder_fails_at_once(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "o"
    first = start_slow(_flags(tiny_dir, out, "--skip_dense_eval"), tmp_path / "first.log", 1.0)
    try:
        wait_for(lambda: (tmp_path / ".o.partial").is_dir(), first, tmp_path / "first.log")
        from pilot_hf.commands import compress

        monkeypatch.setattr(compress, "load_model", lambda *a, **k: pytest.fail("the second run loaded a model"))
        started = time.monotonic()
        assert main(["compress", *_flags(tiny_dir, out)]) == 2
        assert time.monotonic() - started < 10
        assert "another pilot-hf run is writing to" in capsys.readouterr().err
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
        first.wait()
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert not (tmp_path / ".o.partial").exists()


def test_result_folder_holds_the_model_only(reference):
    root, run = reference
    out = root / "ref"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([MARKER_NAME, "README.md", "config.json", "generation_config.json", "metrics.json",
                            "model.safetensors", "run_config.json", "sparsity_layers.png", "sparsity_report.json",
                            "tokenizer.json",
                            "tokenizer_config.json"])
    assert all(not p.is_dir() for p in out.iterdir())  # no checkpoint-*
    checkpoints = root / "ref-checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".pilot-hf-checkpoints",
                                                             *(f"checkpoint-{s}" for s in (2, 4, 6, 8))]
    assert f"checkpoints: {checkpoints}" in run.stdout and f"saved to: {out}" in run.stdout


# ----- 3. resume -------------------------------------------------------------------------------------------

def test_latest_checkpoint_is_numeric_and_complete(tmp_path):
    def checkpoint(step, files=("trainer_state.json", "pilot_state.json")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")

    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "none") is None
    checkpoint(8)
    checkpoint(12)
    checkpoint(100, files=("trainer_state.json",))  # its save was interrupted before pilot_state.json
    checkpoint(64, files=("pilot_state.json",))
    (tmp_path / "checkpoint-999-old").mkdir()
    (tmp_path / "checkpoint-500").write_text("a file")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")  # not 8 (by name), not 100 or 64


@pytest.mark.parametrize("kill_after", [2, 6], ids=["sparsifying", "recovery"])
def test_kill_9_then_resume_gives_the_same_bits(tiny_dir, reference, tmp_path, kill_after):  # noqa: F811
    out, checkpoints, log = tmp_path / "o", tmp_path / "o-checkpoints", tmp_path / "killed.log"
    flags = resume_flags(tiny_dir, out)
    proc = start_slow(flags, log)
    try:
        wait_for(complete(checkpoints / f"checkpoint-{kill_after}"), proc, log)
        if kill_after == 2:
            time.sleep(0.3)  # in the middle of step 3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / ".o.partial").is_dir()  # killed before the end, staging left behind
    latest = Path(latest_checkpoint(checkpoints))
    if kill_after == 6:
        assert json.loads((latest / "pilot_state.json").read_text())["pruned"]  # the recovery phase
    stamps = {p: p.stat().st_mtime_ns for p in latest.iterdir()}

    run = pilot_hf("compress", *flags, "--resume_from_checkpoint", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (tmp_path / ".o.partial").exists()  # the stale staging folder was cleaned
    assert {p: p.stat().st_mtime_ns for p in latest.iterdir()} == stamps  # resumed from it, not retrained
    assert_same_weights(reference[0] / "ref" / "model.safetensors", out / "model.safetensors")


def test_interrupted_save_is_skipped_on_resume(tiny_dir, reference, tmp_path):  # noqa: F811
    import shutil

    out, checkpoints = tmp_path / "o", tmp_path / "o-checkpoints"
    shutil.copytree(reference[0] / "ref-checkpoints", checkpoints)
    (checkpoints / "checkpoint-8" / "pilot_state.json").unlink()  # the save of step 8 was cut short
    flags = resume_flags(tiny_dir, out)

    run = pilot_hf("compress", *flags, "--resume_from_checkpoint", checkpoints / "checkpoint-8")
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "not a complete checkpoint" in last and f"Resume from {checkpoints / 'checkpoint-6'}" in last
    assert "Loading weights" not in run.stderr  # refused before the model was loaded
    assert not out.exists() and not (tmp_path / ".o.partial").exists()

    run = pilot_hf("compress", *flags, "--resume_from_checkpoint", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (checkpoints / "checkpoint-8" / "pilot_state.json").is_file()  # step 8 trained and saved again
    assert_same_weights(reference[0] / "ref" / "model.safetensors", out / "model.safetensors")


def test_fresh_run_does_not_overwrite_earlier_checkpoints(tiny_dir, reference, tmp_path, capsys):  # noqa: F811
    import shutil

    shutil.copytree(reference[0] / "ref-checkpoints", tmp_path / "o-checkpoints")
    assert main(["compress", *resume_flags(tiny_dir, tmp_path / "o")]) == 2
    assert "holds the checkpoints of an earlier run" in capsys.readouterr().err


# ----- 4. SIGTERM and Ctrl-C ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_keeps_checkpoints_and_names_them(tiny_dir, tmp_path, sig, code, word):  # noqa: F811
    out, checkpoints, log = tmp_path / "o", tmp_path / "o-checkpoints", tmp_path / "run.log"
    proc = start_slow(_flags(tiny_dir, out, "--save_steps", 2, "--skip_dense_eval", max_steps=200, recovery_steps=2,
                             save_strategy="steps"), log, 0.2)
    try:
        wait_for(complete(checkpoints / "checkpoint-2"), proc, log)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    lines = log.read_text().splitlines()
    latest = latest_checkpoint(checkpoints)
    named = [line for line in lines if "--resume_from_checkpoint" in line]
    assert len(named) == 1 and f"--resume_from_checkpoint {latest}" in named[0], named
    after = lines[lines.index(named[0]) + 1]  # then the one line of the command (a progress bar may follow)
    assert after.startswith("pilot-hf compress: ") and word in after, after
    assert "Traceback" not in log.read_text()
    assert not out.exists() and not (tmp_path / ".o.partial").exists()  # nothing half-written


# ----- 5. a finished training is never thrown away -----------------------------------------------------------

def test_trained_model_is_kept_when_evaluation_fails(tiny_dir, tmp_path, monkeypatch, caplog, capsys):  # noqa: F811
    from pilot_hf.commands import compress, report

    real, calls = report.evaluate_model, []

    def evaluate_model(*args, **kwargs):  # the dense and one-shot start evaluations work; the one after training
        calls.append(1)                   # runs out of memory
        if len(calls) > 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "evaluate_model", evaluate_model)
    out, staging = tmp_path / "o", tmp_path / ".o.partial"
    with pytest.raises(RuntimeError, match="out of memory"):  # not a user error: a traceback, exit 1 in a shell
        main(["compress", *_flags(tiny_dir, out)])
    assert len(calls) == 3 and not out.exists()
    assert not (tmp_path / "o-checkpoints").exists()  # Trainer made it, saved nothing there: removed
    assert (staging / "model.safetensors").is_file() and (staging / "config.json").is_file()
    assert f"the trained model is saved in {staging}" in caplog.text
    # the next run into the same folder does not silently delete it
    monkeypatch.setattr(compress, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(["compress", *_flags(tiny_dir, out)]) == 2
    assert f"{staging} holds the trained model of an earlier run" in capsys.readouterr().err
    assert (staging / "model.safetensors").is_file()


# ----- 6. only causal LMs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["compress", "oneshot", "evaluate"])
def test_non_causal_model_is_refused_before_training(tiny_dir, tmp_path, monkeypatch, capsys, command):  # noqa: F811
    import transformers as T

    bert = tmp_path / "bert"
    T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)).save_pretrained(bert)
    from pilot_hf.commands import compress, evaluate, oneshot

    for module in (compress, evaluate, oneshot):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = {"compress": _flags(tiny_dir, tmp_path / "o", model_name_or_path=bert),
            "oneshot": ["--model_name_or_path", str(bert), "--output_dir", str(tmp_path / "o")],
            "evaluate": ["--model_name_or_path", str(bert)]}[command]
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert "BertForMaskedLM model, which is not a causal (decoder-only) language model" in err
    assert not (tmp_path / "o").exists()
