"""Model card rendering and the Hub push, with a fake HfApi (no network)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import ModelCard

import pilot_hf
from pilot_hf import card as cards
from pilot_hf import hub
from pilot_hf import serialization as S

RESULTS = [{"dataset": "wikitext", "dataset_name": "WikiText-2", "dataset_config": "wikitext-2-raw-v1",
            "split": "test", "dense_perplexity": 12.3456, "sparse_perplexity": 15.25},
           {"dataset": "pydoc", "split": "validation", "dense_perplexity": 20.0, "sparse_perplexity": 24.5}]


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model()
    pilot_hf.magnitude_prune(model, 0.5)
    return model


def card_info(model, **overrides):
    info = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sparsity_report": pilot_hf.sparsity_report(model),
        "method": "pilot",
        "hyperparameters": {"beta": 0.0, "alpha_schedule": "cosine", "learning_rate": 1e-4, "hub_token": "x"},
        "pattern": "unstructured",
        "results": RESULTS,
        "command": "pilot-hf train --model smollm2-135m --sparsity 0.5 --hub_token hf_abcdefghijklmnopqrstuv",
        "model_name": "smollm2-135m-pilot-50",
        "model_id": "me/smollm2-135m-pilot-50",
        "datasets": ["wikitext"],
        "language": "en",
    }
    info.update(overrides)
    return info


# --- model card ----------------------------------------------------------------------------------------

def test_card_metadata(pruned):
    card = ModelCard(str(cards.render_model_card(card_info(pruned))))  # parses as a Hub model card
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"  # carried from the base model
    assert {"sparse", "pilot"} <= set(data.tags) and "pilot_sparse" not in data.tags
    assert data.datasets == ["wikitext"] and data.language == "en"
    assert data.model_name == "smollm2-135m-pilot-50"
    assert [(r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value)
            for r in data.eval_results] == [
        ("wikitext", "WikiText-2", "wikitext-2-raw-v1", "test", "perplexity", 15.25),
        ("pydoc", "pydoc", None, "validation", "perplexity", 24.5)]
    index = data.to_dict()["model-index"]
    assert index[0]["name"] == "smollm2-135m-pilot-50"
    assert index[0]["results"][0]["metrics"][0] == {"type": "perplexity", "value": 15.25, "name": "Perplexity"}


def test_card_body_numbers(pruned):
    report = pilot_hf.sparsity_report(pruned)
    text = cards.render_model_card(card_info(pruned)).text
    for name, row in report["layers"].items():
        shape = " x ".join(map(str, row["shape"]))
        assert f"| `{name}` | {shape} | {row['numel']:,} | {row['zeros']:,} | {100 * row['sparsity']:.2f}% |" in text
    total = report["total"]
    assert f"| **Total** | | {total['numel']:,} | {total['zeros']:,} | 50.00% |" in text
    assert "| WikiText-2 (wikitext-2-raw-v1) | test | 12.35 | 15.25 | +23.5% |" in text
    assert "| pydoc | validation | 20.00 | 24.50 | +22.5% |" in text
    assert "| `alpha_schedule` | cosine |" in text and "| `learning_rate` | 0.0001 |" in text
    assert "pilot-hf train --model smollm2-135m --sparsity 0.5" in text
    assert "@inproceedings{jacobs2025mask," in text and "Mask in the Mirror: Implicit Sparsification" in text
    assert "arxiv.org/abs/2408.09966" in text
    assert 'from_pretrained("me/smollm2-135m-pilot-50")' in text and "import pilot_hf" not in text


def test_card_never_contains_tokens(pruned):
    text = str(cards.render_model_card(card_info(pruned)))
    assert "hf_abcdefghijklmnopqrstuv" not in text and "--hub_token <redacted>" in text
    assert "| `hub_token` | <redacted> |" in text


def test_write_model_card_and_load_it_back(pruned, tmp_path):
    path = cards.write_model_card(tmp_path, card_info(pruned, compressed=True))
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    assert card.data.eval_results[0].metric_value == 15.25
    assert "pilot_sparse" in card.data.tags
    assert "import pilot_hf" in card.text


def test_card_minimal_info_and_local_base_model(pruned, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    card = ModelCard(str(cards.render_model_card({"base_model": str(base),
                                                "sparsity_report": pilot_hf.sparsity_report(pruned)})))
    assert card.data.license == "mit"  # from the local base model's card
    assert card.data.base_model is None  # a local path is not Hub metadata
    assert card.data.eval_results is None and "No evaluation results" in card.text
    unknown = cards.render_model_card({"base_model": "someone/unknown-model",
                                     "sparsity_report": pilot_hf.sparsity_report(pruned)})
    assert unknown.data.license is None and unknown.data.base_model == "someone/unknown-model"


@pytest.mark.parametrize("bad, message", [
    ({"perplexity": 3.0}, "unknown model card fields"),
    ({"results": [{"dataset": "wikitext"}]}, "sparse_perplexity"),
    ({"sparsity_report": {"total": {}}}, "sparsity_report"),
])
def test_card_rejects_bad_info(pruned, bad, message):
    with pytest.raises(ValueError, match=message):
        cards.render_model_card(card_info(pruned, **bad))


def test_template_is_found():
    path = cards.model_card_template()
    assert path.name == "pilot_model_card.md.j2" and path.is_file()


# --- push ------------------------------------------------------------------------------------------------

class FakeApi:
    """Records calls like HfApi would receive them; can fail at a given step."""

    def __init__(self, token="hf_fake_token_for_tests", fail_on=None):
        self.token, self.fail_on, self.calls = token, fail_on, []

    def _record(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if self.fail_on == name:
            raise ConnectionError("503 Service Unavailable")

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", repo_id=repo_id, **kwargs)

    def create_commit(self, **kwargs):
        operations = kwargs.pop("operations")
        kwargs["sources"] = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
        kwargs["snapshot"] = {name: path.read_bytes() for name, path in kwargs["sources"].items()}
        self._record("create_commit", **kwargs)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def output_dir(pruned, tmp_path):
    folder = tmp_path / "run"
    pruned.save_pretrained(folder)
    cards.write_model_card(folder, card_info(pruned))
    (folder / "training_args.bin").write_bytes(b"pickle")  # never uploaded
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"pickle")
    return folder


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_calls_the_api(output_dir):
    api = FakeApi()
    result = hub.push_to_hub(output_dir, "me/tiny-sparse", private=True, revision="v1", api=api,
                             commit_message="first")
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/tiny-sparse", "private": True, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][1]["branch"] == "v1"
    upload = api.calls[2][1]
    assert upload["repo_id"] == "me/tiny-sparse" and upload["revision"] == "v1"
    assert upload["commit_message"] == "first"
    assert all(path == output_dir / name for name, path in upload["sources"].items())
    uploaded = [name for name, _ in result.files]
    assert sorted(upload["sources"]) == uploaded
    # the card's per-layer sparsity figure goes up with it (the Hub renders it in the card)
    assert uploaded == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                        "sparsity_layers.png"]
    assert dict(result.files)["model.safetensors"] == (output_dir / "model.safetensors").stat().st_size
    assert result.commit_url.endswith("/commit/abc") and not result.compressed


def test_push_compressed_uploads_a_temporary_copy(output_dir, pruned):
    before = digest(output_dir)
    api = FakeApi()
    result = hub.push_to_hub(output_dir, "me/tiny-sparse", compressed=True, api=api)
    upload = api.calls[-1][1]
    assert all(output_dir not in path.parents and not path.exists() for path in upload["sources"].values())  # cleaned
    config = json.loads(upload["snapshot"]["config.json"])
    assert config["quantization_config"]["quant_method"] == "pilot_sparse"
    assert b"pilot_sparse" in upload["snapshot"]["README.md"] and b"import pilot_hf" in upload["snapshot"]["README.md"]
    assert dict(result.files)["model.safetensors"] == len(upload["snapshot"]["model.safetensors"])
    assert dict(result.files)["model.safetensors"] < (output_dir / "model.safetensors").stat().st_size
    assert result.compressed and digest(output_dir) == before  # the user's folder is untouched
    # What was uploaded loads back to the same weights.
    copy = output_dir.parent / "downloaded"
    copy.mkdir()
    for name, data in upload["snapshot"].items():
        (copy / name).write_bytes(data)
    loaded = S.load_compressed(copy)
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(tensor.view(torch.int32), loaded.state_dict()[name].view(torch.int32)), name


def test_dry_run_lists_files_and_contacts_nobody(output_dir, monkeypatch, capsys):
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no token needed for a dry run
    api = FakeApi(token=None)
    result = hub.push_to_hub(output_dir, "me/tiny-sparse", dry_run=True, api=api)
    assert api.calls == [] and result.dry_run
    assert capsys.readouterr().out == ""  # the library prints nothing; `pilot-hf push` prints describe()
    printed = result.describe()
    assert "would upload 5 files" in printed and "model.safetensors" in printed and "sparsity_layers.png" in printed
    assert "training_args.bin" not in printed and "checkpoint-10" not in printed
    compressed = hub.push_to_hub(output_dir, "me/tiny-sparse", dry_run=True, compressed=True, api=api)
    assert dict(compressed.files)["model.safetensors"] < dict(result.files)["model.safetensors"]


@pytest.mark.parametrize("step", ["create_repo", "create_commit"])
@pytest.mark.parametrize("compressed", [False, True])
def test_failed_push_keeps_files_and_says_what_to_retry(output_dir, step, compressed):
    before = digest(output_dir)
    with pytest.raises(hub.PushError) as err:
        hub.push_to_hub(output_dir, "me/tiny-sparse", compressed=compressed, api=FakeApi(fail_on=step))
    message = str(err.value)
    assert "503 Service Unavailable" in message and "unchanged" in message
    assert f"pilot-hf push {output_dir} --repo_id me/tiny-sparse" in message
    assert ("--compressed" in message) == compressed
    assert "hf_fake_token_for_tests" not in message
    assert digest(output_dir) == before


def test_missing_token(output_dir, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    api = FakeApi(token=None)
    with pytest.raises(hub.PushError, match="hf auth login.*HF_TOKEN"):
        hub.push_to_hub(output_dir, "me/tiny-sparse", api=api)
    assert api.calls == []


def test_token_from_environment_lookup(output_dir, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: "hf_from_env")
    api = FakeApi(token=None)
    hub.push_to_hub(output_dir, "me/tiny-sparse", api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    assert "hf_from_env" not in repr(api.calls)  # the token is HfApi's business, never passed around


@pytest.mark.parametrize("repo_id", ["tiny-sparse", "a/b/c", "me/bad--name", "me/-x", "me/x.git", "", "me/"])
def test_bad_repo_id(output_dir, repo_id):
    with pytest.raises(ValueError, match="namespace/name"):
        hub.push_to_hub(output_dir, repo_id, api=FakeApi())


def test_not_a_pilot_output_folder(tmp_path, output_dir):
    with pytest.raises(ValueError, match="not a folder"):
        hub.push_to_hub(tmp_path / "nowhere", "me/x", api=FakeApi())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"missing config\.json, model weights"):
        hub.push_to_hub(empty, "me/x", api=FakeApi())
    (output_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing model weights \(model\.safetensors"):
        hub.push_to_hub(output_dir, "me/x", api=FakeApi())


def test_missing_shard_is_named(pruned, tmp_path):
    folder = tmp_path / "sharded"
    pruned.save_pretrained(folder, max_shard_size="20KB")
    shard = min(folder.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        hub.push_to_hub(folder, "me/x", api=FakeApi())


def test_cli_main(output_dir, monkeypatch, capsys):
    from pilot_hf.commands import main

    monkeypatch.setattr(hub, "get_token", lambda: None)
    assert main(["push", str(output_dir), "--repo_id", "me/x", "--dry_run"]) == 0
    assert "would upload 5 files" in capsys.readouterr().out
    assert main(["push", "--output_dir", str(output_dir), "--repo_id", "me/x", "--compressed", "--dry_run"]) == 0
    assert "[compressed]" in capsys.readouterr().out
    config = output_dir.parent / "push.yaml"  # push reads --config like every command
    config.write_text(f"output_dir: {output_dir}\nrepo_id: me/x\ndry_run: true\n")
    assert main(["push", "--config", str(config)]) == 0
    assert "would upload 5 files" in capsys.readouterr().out
    assert main(["push", str(output_dir), "--repo_id", "me/x"]) == 1  # no token: a PushError, printed
    assert "hf auth login" in capsys.readouterr().err


def test_push_never_uploads_hidden_secret_or_linked_files(output_dir, tmp_path):
    """A result folder that also holds a .env, an ssh key, a certificate and symlinks to files outside it: none of
    them (nor what the links point to) is uploaded, and the plan says what was left out."""
    secret = "hf_" + "S" * 30
    (output_dir / ".env").write_text(f"HF_TOKEN={secret}\n")
    (output_dir / ".ssh").mkdir()
    (output_dir / ".ssh" / "id_rsa").write_text(secret)
    (output_dir / "server.pem").write_text(secret)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwords.txt").write_text(secret)
    (output_dir / "notes.txt").symlink_to(outside / "passwords.txt")
    (output_dir / "linked").symlink_to(outside, target_is_directory=True)
    api = FakeApi()
    result = hub.push_to_hub(output_dir, "me/tiny-sparse", api=api)
    uploaded = api.calls[-1][1]["snapshot"]
    assert sorted(uploaded) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                "sparsity_layers.png"]
    assert not any(secret.encode() in data for data in uploaded.values())
    assert result.left_out == [".env", ".ssh", "linked", "notes.txt", "server.pem"]
    assert "left out (hidden, secret or linked; never uploaded): .env, .ssh, linked, notes.txt" in result.describe()
    compressed = hub.push_to_hub(output_dir, "me/tiny-sparse", compressed=True, api=api)
    assert not any(secret.encode() in data for data in api.calls[-1][1]["snapshot"].values())
    assert ".env" not in [name for name, _ in compressed.files]
