"""Nothing lost, nothing wrong, round 2 (issue 25): a compressed checkpoint never loads as random weights, an
output folder on a mount point still gets its result, only a complete model is claimed as saved, no file
pilot-hf did not write is overwritten or deleted, resuming never mixes data, and a full disk is one paragraph.

The CLI cases run in-process through `pilot_hf.commands.main` on the tiny Llama of test_cli."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import byte_tokenizer, save_tiny_llama, tiny_model
from helpers import ENV, error_lines, tiny_flags
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import pilot_hf
from pilot_hf import runs
from pilot_hf import serialization as S
from pilot_hf.commands import main
from pilot_hf.runs import MARKER_NAME, OutputError, OutputFolder, latest_checkpoint

UP, DOWN = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"  # [64, 32] and [32, 64]


def _flags(t, out, *extra, **replace):
    flags = [str(a) for a in tiny_flags(t, out)]
    for name, value in replace.items():
        flags[flags.index(f"--{name}") + 1] = str(value)
    return [*flags, *map(str, extra)]


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_model(folder: Path) -> None:
    """A complete (tiny, fake) saved model: config.json and model.safetensors."""
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")


@pytest.fixture
def pruned_dense(tmp_path):
    """(a 50%-sparse tiny Llama, its dense save_pretrained folder with a card)."""
    model = tiny_model()
    pilot_hf.magnitude_prune(model, 0.5)
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A sparse model\n")
    return model, tmp_path / "dense"


# ----- 1. a compressed checkpoint never loads as random weights ------------------------------------------------

PLAIN_TRANSFORMERS = """
import sys
import transformers
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "pilot_hf" not in sys.modules
print("LOADED")
"""


def test_plain_transformers_refuses_a_compressed_checkpoint_and_says_how_to_load_it(pruned_dense, tmp_path):
    model, dense = pruned_dense
    S.compress_checkpoint(dense, tmp_path / "packed")
    run = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(tmp_path / "packed")], capture_output=True,
                         text=True, env=ENV)
    assert run.returncode != 0 and "LOADED" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert "`pip install pilot-hf`" in last and "`import pilot_hf`" in last and "load_compressed" in last
    # With pilot_hf it loads bit-exact, and a dense re-save is a plain checkpoint (no guard, no quantization_config).
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in model.state_dict().items())
    assert getattr(loaded.config, S.TRANSFORMERS_WEIGHTS, None) is None
    loaded.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert S.TRANSFORMERS_WEIGHTS not in config and "quantization_config" not in config
    assert all(torch.equal(t, S.load_compressed(tmp_path / "packed").state_dict()[n])
               for n, t in model.state_dict().items())


def test_card_of_a_compressed_copy_says_how_to_load_it(pruned_dense, tmp_path):
    _, dense = pruned_dense
    S.compress_checkpoint(dense, tmp_path / "packed")
    card = (tmp_path / "packed" / "README.md").read_text()
    assert "pip install pilot-hf" in card and "import pilot_hf" in card and "pilot_sparse" in card
    assert (dense / "README.md").read_text().count("pip install") == 0  # the source is only read


def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_swapped_shapes_are_refused_by_every_loader(pruned_dense, tmp_path):
    _, dense = pruned_dense
    packed = tmp_path / "packed"
    S.compress_checkpoint(dense, packed)

    def swap(t):  # same number of entries, bitmask and values untouched: every structural check passes
        t[UP + "_shape"], t[DOWN + "_shape"] = t[DOWN + "_shape"], t[UP + "_shape"]

    _rewrite(packed, swap)
    S.verify_compressed(packed)
    for load in (S.load_compressed, S.load_compressed_state_dict, T.AutoModelForCausalLM.from_pretrained,
                 lambda p: S.verify_compressed(p, check_digests=True)):
        with pytest.raises(ValueError, match=r"(up|down)_proj.weight(: the expanded weight \(shape .*sha256 digest|_shape: the checkpoint stores shape)"):
            load(packed)


def test_version_2_checkpoints_still_load(pruned_dense, tmp_path):
    """Written before digests covered shapes (and before the guard): digests of the bytes only."""
    model, dense = pruned_dense
    packed = tmp_path / "packed"
    S.compress_checkpoint(dense, packed)
    config = json.loads((packed / "config.json").read_text())
    qc = config["quantization_config"]
    qc["format_version"] = 2
    qc["digests"] = {k: S.tensor_digest(model.state_dict()[k], version=2) for k in qc["digests"]}
    del config[S.TRANSFORMERS_WEIGHTS]
    (packed / "config.json").write_text(json.dumps(config))
    for load in (lambda p: S.load_compressed(p).state_dict(), S.load_compressed_state_dict,
                 lambda p: T.AutoModelForCausalLM.from_pretrained(p).state_dict()):
        loaded = load(packed)
        assert all(torch.equal(t, loaded[n]) for n, t in model.state_dict().items())


# ----- 2. and 3. the output folder: mount points, a rename that fails, only a complete model is claimed -------

def _mount_point(monkeypatch, folder: Path) -> None:
    """`folder` behaves like a Docker volume: os.path.ismount says so, and renaming it fails with EBUSY."""
    real_replace, real_rename = os.replace, os.rename

    def refuse(real):
        def move(src, dst, *args, **kwargs):
            if folder in (Path(src), Path(dst)):
                raise OSError(errno.EBUSY, "Device or resource busy", str(folder))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(runs.os.path, "ismount", lambda p: Path(p) == folder)
    monkeypatch.setattr(runs.os, "replace", refuse(real_replace))
    monkeypatch.setattr(runs.os, "rename", refuse(real_rename))


def test_output_dir_on_a_mount_point_gets_the_result(tmp_path, monkeypatch):
    out = tmp_path / "volume"
    out.mkdir()
    (out / "lost+found").mkdir()  # a fresh ext4 file system: not a user's file
    _mount_point(monkeypatch, out)
    with OutputFolder(out) as folder:
        assert folder.staging.parent == out  # staged on the same file system
        write_model(folder.staging)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER_NAME, ".pilot-hf.lock", "config.json",
                                                           "lost+found", "model.safetensors"])
    # --overwrite_output_dir replaces that earlier result in place; lost+found stays
    with OutputFolder(out, overwrite=True) as folder:
        (folder.staging / "config.json").write_text('{"new": 1}')
        save_file({"w": torch.ones(4)}, folder.staging / "model.safetensors")
    assert json.loads((out / "config.json").read_text()) == {"new": 1} and (out / "lost+found").is_dir()
    assert not (out / OutputFolder.IN_PLACE_STAGING).exists()
    # a file put there during the run is someone's: nothing is replaced, the result waits in the staging folder
    with pytest.raises(OutputError, match=f"changed while this run worked.*complete in {folder.staging}"):
        with OutputFolder(out, overwrite=True) as folder:
            write_model(folder.staging)
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text()) == {"new": 1}
    assert runs.is_complete_model(folder.staging)


def test_oneshot_into_a_mount_point(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "volume"
    out.mkdir()
    _mount_point(monkeypatch, out)
    code = main(["oneshot", "--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(out),
                 "--eval_texts", "pydoc", "--eval_max_tokens", "256", "--eval_max_length", "64", "--skip_dense_eval"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "run_config.json").is_file()
    assert not (out / OutputFolder.IN_PLACE_STAGING).exists() and not (tmp_path / ".volume.partial").exists()


def test_rename_that_fails_at_the_end_names_where_the_result_is(tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real(src, dst)

    monkeypatch.setattr(runs.os, "replace", replace)
    with pytest.raises(OutputError, match=rf"could not be moved into {out} \(Invalid cross-device link\); it is "
                                          rf"complete in {tmp_path / '.o.partial'}"):
        with OutputFolder(out) as folder:
            write_model(folder.staging)
    assert runs.is_complete_model(folder.staging)
    # the next run into the same folder is refused and names it, never deletes it
    with pytest.raises(OutputError, match="holds the trained model of an earlier run"), OutputFolder(out):
        pass
    assert runs.is_complete_model(folder.staging)


def _config_only(staging):
    (staging / "config.json").write_text("{}")


def _weights_cut_short(staging):
    write_model(staging)
    path = staging / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])


def _shard_missing(staging):
    write_model(staging)
    (staging / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}}))


def _tokenizer_cut_short(staging):
    write_model(staging)
    (staging / "tokenizer.json").write_text('{"model": {"vocab": ')


@pytest.mark.parametrize("partial", [_config_only, _weights_cut_short, _shard_missing, _tokenizer_cut_short])
def test_only_a_complete_model_is_claimed_as_saved(tmp_path, caplog, partial):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="SIGTERM between two files"), OutputFolder(out) as folder:
        partial(folder.staging)
        raise RuntimeError("SIGTERM between two files (simulated)")
    assert "saved in" not in caplog.text and not folder.staging.exists() and not out.exists()
    with pytest.raises(RuntimeError), OutputFolder(out) as folder:
        write_model(folder.staging)
        raise RuntimeError("evaluation failed (simulated)")
    assert f"the trained model is saved in {folder.staging}" in caplog.text


# ----- 4. evaluate --output_file writes a new file only --------------------------------------------------------

def test_evaluate_never_overwrites_a_file(tiny_dir, tmp_path, capsys):  # noqa: F811
    config = tiny_dir / "model" / "config.json"
    before = config.read_bytes()
    assert main(["evaluate", "--model_name_or_path", str(tiny_dir / "model"), "--output_file", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err and config.read_bytes() == before
    # a file that appears while the results are written is not replaced either
    target = tmp_path / "eval.json"
    runs.write_json(target, {"first": 1}, replace=False)
    with pytest.raises(FileExistsError):
        runs.write_json(target, {"second": 2}, replace=False)
    assert json.loads(target.read_text()) == {"first": 1} and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


# ----- 5. checkpoints: only pilot-hf's are ever rotated; a cut-off one is never the hint -----------------------

def test_foreign_checkpoints_are_left_untouched(tiny_dir, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "my-checkpoints"
    for step in (1, 2):
        (mine / f"checkpoint-{step}").mkdir(parents=True)
        (mine / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"someone's")
    before = digest(mine)
    code = main(["compress", *_flags(tiny_dir, tmp_path / "o", "--checkpoint_dir", mine, "--save_steps", 2,
                                     "--save_total_limit", 1, save_strategy="steps")])
    assert code == 2 and "which pilot-hf did not write" in capsys.readouterr().err
    assert digest(mine) == before and not (mine / runs.CHECKPOINTS_MARKER_NAME).exists()


def test_checkpoint_rotation_in_a_folder_of_its_own(tiny_dir, tmp_path, capsys):  # noqa: F811
    checkpoints = tmp_path / "o-checkpoints"
    code = main(["compress", *_flags(tiny_dir, tmp_path / "o", "--save_steps", 2, "--save_total_limit", 1,
                                     "--skip_dense_eval", save_strategy="steps")])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == [runs.CHECKPOINTS_MARKER_NAME, "checkpoint-6"]
    state = json.loads((checkpoints / "checkpoint-6" / "pilot_state.json").read_text())
    assert state["data"]["block_size"] == 32 and len(state["data"]["tokens_sha256"]) == 64  # the data it saw


def test_checkpoint_ownership(tmp_path):
    legacy = tmp_path / "legacy"  # written by pilot-hf before the folder got a marker: pilot_state.json says so
    (legacy / "checkpoint-2").mkdir(parents=True)
    (legacy / "checkpoint-2" / "pilot_state.json").write_text("{}")
    assert runs.foreign_checkpoints(legacy) == []
    (legacy / "checkpoint-4").mkdir()
    assert runs.foreign_checkpoints(legacy) == ["checkpoint-4"]
    (legacy / MARKER_NAME).write_text("{}")  # an output folder's marker says nothing about checkpoints
    assert runs.foreign_checkpoints(legacy) == ["checkpoint-4"]
    (legacy / runs.CHECKPOINTS_MARKER_NAME).write_text("{}")
    assert runs.foreign_checkpoints(legacy) == []


def test_checkpoint_cut_short_is_skipped(tmp_path):
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in runs.CHECKPOINT_FILES:
            (folder / name).write_text("{}")
        save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
        torch.save({"step": step}, folder / "optimizer.pt")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    optimizer = tmp_path / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-40])
    assert runs.checkpoint_problem(tmp_path / "checkpoint-4") == "optimizer.pt is cut short or damaged"
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert runs.resume_hint(tmp_path).endswith(f"{tmp_path / 'checkpoint-2'} (its latest complete checkpoint)")


# ----- 6. compress_checkpoint / save_compressed: the output protocol of every command --------------------------

def test_compressed_output_never_deletes_or_overwrites_user_files(pruned_dense, tmp_path):
    model, dense = pruned_dense
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model_backup.safetensors").write_bytes(b"precious weights")
    (out / "config.json").write_text('{"mine": true}')
    before = digest(out)
    with pytest.raises(OutputError, match="already exists and is not empty"):
        S.compress_checkpoint(dense, out)
    with pytest.raises(OutputError, match="was not written by pilot-hf"):
        S.compress_checkpoint(dense, out, overwrite=True)
    with pytest.raises(OutputError, match="was not written by pilot-hf"):
        S.save_compressed(model, out, overwrite=True)
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["dense", "mine"]
    # a folder pilot-hf wrote: refused without overwrite, replaced with it
    packed = tmp_path / "packed"
    S.save_compressed(model, packed)
    assert (packed / MARKER_NAME).is_file()
    with pytest.raises(OutputError, match="already exists"):
        S.save_compressed(model, packed)
    S.save_compressed(model, packed, overwrite=True, keep_zero_signs=False)
    assert all(torch.equal(t, S.load_compressed(packed).state_dict()[n]) for n, t in model.state_dict().items())


# ----- 7. resume compares the data -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):  # noqa: F811
    """A finished run's checkpoints (every 2 steps of 4)."""
    root = tmp_path_factory.mktemp("resume")
    assert main(["compress", *_flags(tiny_dir, root / "o", "--save_steps", 2, "--skip_dense_eval",
                                     max_steps=4, recovery_steps=1, save_strategy="steps")]) == 0
    return root / "o-checkpoints"


@pytest.mark.parametrize("change,message", [
    ({"block_size": 16}, "block_size: checkpoint 32 vs now 16"),
    ({"train_file": "other"}, "other token content"),
])
def test_resume_on_other_data_is_refused(tiny_dir, checkpoints, tmp_path, capsys, change, message):  # noqa: F811
    if change.get("train_file") == "other":  # as long as the original, other words
        other = tmp_path / "other.txt"
        other.write_text((tiny_dir / "train.txt").read_text().replace("fox", "cat"))
        change = {"train_file": other}
    out = tmp_path / "again"
    code = main(["compress", *_flags(tiny_dir, out, "--save_steps", 2, "--skip_dense_eval", "--checkpoint_dir",
                                     checkpoints, "--resume_from_checkpoint", "true", max_steps=4, recovery_steps=1,
                                     save_strategy="steps", **change)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = error_lines(err)[-1]
    assert f"cannot resume {checkpoints / 'checkpoint-4'}: it was trained on other data" in line and message in line
    assert not out.exists() and not (tmp_path / ".again.partial").exists()


# ----- 10. a full disk: exit 2, one paragraph that says what was kept ------------------------------------------

TORCH_DISK_FULL = ("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 64; PytorchStreamWriter failed "
                   "writing file data/0: file write failed")


def test_disk_full_during_a_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up while checkpoint-4 is written
        if "checkpoint-4" in str(f):
            raise RuntimeError(TORCH_DISK_FULL)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out, checkpoints = tmp_path / "o", tmp_path / "o-checkpoints"
    code = main(["compress", *_flags(tiny_dir, out, "--save_steps", 2, "--skip_dense_eval", save_strategy="steps")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = error_lines(err)[-1]
    assert line.startswith("pilot-hf compress: error: the disk filled up while pilot-hf was saving")
    assert f"checkpoints are in {checkpoints}; resume with --resume_from_checkpoint {checkpoints / 'checkpoint-2'}" \
        in line and "Free some space" in line
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_disk_full_during_the_final_save(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "o"
    code = main(["compress", *_flags(tiny_dir, out, "--skip_dense_eval")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = error_lines(err)[-1]
    assert "the disk filled up" in line and f"nothing was written to {out}" in line
    assert "saved in" not in err  # config.json alone is no model
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


# ----- Low: a distillation teacher with another vocabulary of the same size ------------------------------------

def _permuted_tokenizer():
    """conftest's byte tokenizer with the byte tokens in reverse order: the same size, other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(),
                                                                             reverse=True))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def test_teacher_with_another_vocabulary_is_refused(tiny_dir, tmp_path, capsys):  # noqa: F811
    teacher = save_tiny_llama(tmp_path) / "model"
    _permuted_tokenizer().save_pretrained(teacher)
    assert len(_permuted_tokenizer()) == len(byte_tokenizer())
    code = main(["compress", *_flags(tiny_dir, tmp_path / "o", "--distill_logit_weight", 1,
                                     "--teacher_model_name_or_path", teacher, "--skip_dense_eval")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = error_lines(err)[-1]
    assert f"the teacher ({teacher}) uses another vocabulary than the model's tokenizer" in line
    byte_tokenizer().save_pretrained(teacher)  # the same tokenizer: accepted
    pilot_hf.loading.check_same_vocabulary(byte_tokenizer(), str(teacher))


def test_pilot_hf_loaders_refuse_compressed_parts_without_their_config(pruned_dense, tmp_path):
    """`pilot-hf evaluate` scored such a folder as a model with random layers (perplexity 104 instead of 62)."""
    _, dense = pruned_dense
    packed = tmp_path / "packed"
    S.compress_checkpoint(dense, packed)
    config = json.loads((packed / "config.json").read_text())
    del config["quantization_config"], config[S.TRANSFORMERS_WEIGHTS]
    (packed / "config.json").write_text(json.dumps(config))
    message = "no pilot_sparse quantization_config that describes them"
    for load in (S.load_compressed, S.load_compressed_state_dict, S.check_weight_files,
                 lambda p: pilot_hf.loading.load_model(pilot_hf.loading.ModelArguments(model_name_or_path=str(p)))):
        with pytest.raises(ValueError, match=message):
            load(packed)
