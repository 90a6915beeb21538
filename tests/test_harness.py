"""Evaluation the way the field reports: lm-evaluation-harness tasks on the in-memory model (checked against a
direct computation of the choices' log-likelihoods), the Hub checks before any model is loaded, perplexity on a
dataset or file by the field's convention, and the results in metrics.json, the sweep table and the card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from conftest import byte_tokenizer

from pilot_hf import harness
from pilot_hf.data import builtin_split, check_hub_datasets, encode_text, load_eval_rows
from pilot_hf.evaluation import EvalArguments, dataset_perplexity, evaluate_model, perplexity

pytest.importorskip("lm_eval")  # the `eval` extra (in `dev`, so the suite and CI have it)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DOCS = 48  # documents of the own task scored in the equality test (its first ones)


def byte_model(context: int = 1024, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, bos_token_id=0, eos_token_id=1)).to(dtype).eval()


def direct_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(' ' + choice | context), summed over the choice's tokens, from one full forward pass each: the
    context's tokens as the tokenizer encodes the context alone (BOS first), the choice's tokens as the rest of
    the encoding of context + ' ' + choice."""
    context_ids = tokenizer(context)["input_ids"]
    out = []
    for choice in choices:
        whole = tokenizer(context + " " + choice)["input_ids"]
        assert whole[:len(context_ids)] == context_ids
        with torch.no_grad():
            log_probs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        targets = torch.arange(len(context_ids), len(whole))
        out.append(log_probs[targets - 1, torch.tensor(whole)[targets]].sum().item())
    return out


@pytest.fixture(scope="module")
def own_task_run():
    # float64, so the harness's batched, padded forward passes and ours differ by ~1e-12, far below the
    # margins between the choices of a random model (which can be ~1e-5 apart)
    model, tokenizer = byte_model(dtype=torch.float64), byte_tokenizer()
    results, raw = harness.evaluate_tasks(model, tokenizer, [harness.OWN_TASK], limit=DOCS, batch_size=8,
                                          log_samples=True)
    return model, tokenizer, results, raw


def test_own_task_accuracy_equals_a_direct_computation(own_task_run):
    model, tokenizer, results, raw = own_task_run
    docs = [json.loads(line) for line in harness.NEXT_VERSE_FILE.read_text().splitlines()][:DOCS]
    samples = sorted(raw["samples"][harness.OWN_TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(DOCS))
    acc, acc_norm = [], []
    for doc, sample in zip(docs, samples):
        lls = np.array(direct_loglikelihoods(model, tokenizer, doc["context"], doc["choices"]))
        harness_lls = np.array([ll for ll, _ in sample["filtered_resps"]])
        np.testing.assert_allclose(harness_lls, lls, rtol=1e-9, atol=1e-9)
        # the argmax is decided by a margin far above the float difference between the two computations
        difference = np.abs(harness_lls - lls).max()
        for scores in (lls, lls / np.array([len(c) for c in doc["choices"]])):
            top2 = np.sort(scores)[-2:]
            assert top2[1] - top2[0] > 10 * difference + 1e-9
        acc.append(float(np.argmax(lls) == doc["label"]))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in doc["choices"]])) == doc["label"]))
    entry = results.tasks[harness.OWN_TASK]
    assert entry["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert entry["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert entry["samples"] == DOCS and entry["num_fewshot"] == 0 and entry["split"] == "test"
    assert results.harness_version == harness.harness_version() and results.harness_version.startswith("0.4")


def test_own_task_scores_a_wrapped_model_as_the_merged_one_and_restores_its_mode(own_task_run):
    from pilot_hf import PILoTConfig, merge_and_unload, prune_model, wrap_model

    _, tokenizer, _, _ = own_task_run
    model = byte_model(seed=3)
    wrap_model(model, PILoTConfig(target_modules="all-linear", beta=1.0))
    prune_model(model, sparsity=0.5)
    model.train()
    wrapped, _ = harness.evaluate_tasks(model, tokenizer, [harness.OWN_TASK], limit=16)
    assert model.training  # put back as it was
    merge_and_unload(model)
    merged, _ = harness.evaluate_tasks(model.eval(), tokenizer, [harness.OWN_TASK], limit=16)
    for metric in ("acc", "acc_norm"):
        assert wrapped.tasks[harness.OWN_TASK][metric] == merged.tasks[harness.OWN_TASK][metric]
    assert tokenizer.pad_token is None  # the harness set its pad token on a copy


def test_shipped_task_file_is_what_the_builder_makes_from_the_held_out_kjv():
    from pilot_hf.data import check_builtin_available

    try:
        check_builtin_available("kjv")
    except ValueError as err:
        pytest.skip(str(err))
    shipped = [json.loads(line) for line in harness.NEXT_VERSE_FILE.read_text().splitlines()]
    assert shipped == harness.build_next_verse_docs(builtin_split("kjv", "test"))
    assert len(shipped) == 300 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in shipped)
    held_out = builtin_split("kjv", "test")
    assert all(d["context"] in held_out and d["choices"][d["label"]] in held_out for d in shipped)
    train = builtin_split("kjv", "train")
    assert sum(d["choices"][d["label"]] in train for d in shipped) < 10  # (short verses may recur verbatim)


def test_own_tasks_are_the_yaml_files_and_presets_expand():
    names = sorted(p.read_text().split("task: ", 1)[1].split()[0] for p in harness.TASKS_DIR.glob("*.yaml"))
    assert names == sorted(harness.OWN_TASKS)
    assert harness.expand_tasks(["zeroshot7", "boolq", harness.OWN_TASK]) == [
        "boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", harness.OWN_TASK]


def test_standard_tasks_resolve_to_their_hub_datasets_and_fail_offline_in_one_paragraph(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    needed = harness.task_hub_datasets(["zeroshot7"])
    assert ("allenai/ai2_arc", "ARC-Challenge") in needed and ("aps/super_glue", "boolq") in needed
    assert harness.task_hub_datasets([harness.OWN_TASK]) == []
    with pytest.raises(ValueError, match="Hub is offline") as err:
        harness.check_tasks(["arc_easy"])
    assert f"--tasks {harness.OWN_TASK}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown task.*arc_esay.*did you mean arc_easy"):
        harness.check_tasks(["arc_esay"])


def test_hub_unreachable_is_one_paragraph_too(monkeypatch):
    import huggingface_hub

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("pilot_hf.assets.is_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(ValueError, match="cannot be reached from here.*HF_HUB_OFFLINE=1"):
        check_hub_datasets([("wikitext", "wikitext-2-raw-v1")], what="--eval_dataset_name wikitext")


def test_cli_fails_offline_before_loading_the_model(tmp_path):
    """The documented command, offline: exit 2, one paragraph naming every Hub dataset, no model loaded (the
    model path does not even exist as weights: a folder with a config only would fail at loading)."""
    folder = tmp_path / "m"
    byte_model().config.save_pretrained(folder)  # config only: loading weights would fail
    run = subprocess.run([sys.executable, "-m", "pilot_hf", "evaluate", "--model_name_or_path", str(folder),
                          "--eval_dataset_name", "wikitext", "--eval_dataset_config_name", "wikitext-2-raw-v1",
                          "--tasks", "zeroshot7"], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("pilot-hf evaluate: error:") and "HF_HUB_OFFLINE=1" in message
    for name in ("wikitext", "allenai/winogrande", "Rowan/hellaswag", f"--tasks {harness.OWN_TASK}", "--eval_file"):
        assert name in message


def test_field_convention_is_joined_text_in_whole_windows(tmp_path):
    rows = ["", " = Title = ", "", "The quick brown fox jumps over the lazy dog. " * 9, "", "Pack my box. " * 30]
    file = tmp_path / "wiki.jsonl"
    file.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    model, tokenizer = byte_model(context=256), byte_tokenizer()
    args = EvalArguments(eval_file=str(file), eval_seqlen=64)
    assert args.eval_texts == [] and args.dataset_label == "wiki"
    assert load_eval_rows(file=str(file)) == rows
    result = dataset_perplexity(model, tokenizer, args)
    ids = torch.tensor(encode_text(tokenizer, "\n\n".join(rows)))
    windows = len(ids) // 64
    nll = 0.0
    for w in range(windows):  # SparseGPT's loop: loss of each window of seqlen, the remainder dropped
        chunk = ids[w * 64:(w + 1) * 64][None]
        with torch.no_grad():
            nll += model(chunk, labels=chunk).loss.item()
    assert result.windows == windows and result.tokens_scored == windows * 63
    assert result.perplexity == pytest.approx(np.exp(nll / windows), rel=1e-5)
    # 'documents': each row + EOS, scored like the built-in texts
    docs = EvalArguments(eval_file=str(file), eval_convention="documents", eval_max_length=64)
    full = evaluate_model(model, tokenizer, docs)["wiki"]
    assert full["source"]["convention"] == "documents" and full["stride"] == 64
    assert full["perplexity"] != pytest.approx(result.perplexity)
    text_file = tmp_path / "plain.txt"
    text_file.write_text("\n\n".join(rows))  # a .txt file is one text, the same stream
    assert dataset_perplexity(model, tokenizer, EvalArguments(eval_file=str(text_file), eval_seqlen=64)) \
        .perplexity == pytest.approx(perplexity(model, ids[:windows * 64], max_length=64, progress=False).perplexity,
                                     rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_dataset_name": "wikitext", "eval_file": "x.txt"}, "not both"),
    ({"eval_file": "x.docx"}, "unsupported extension"),
    ({"eval_file": "x.txt", "eval_convention": "papers"}, "eval_convention"),
    ({"eval_texts": ["none"]}, "nothing to evaluate"),
    ({"tasks": ["arc_easy"], "task_limit": 0}, "task_limit"),
    ({"tasks": ["arc_easy"], "num_fewshot": -1}, "num_fewshot"),
    ({"eval_file": "kjv.txt", "eval_texts": ["kjv"]}, "also a built-in text"),
])
def test_bad_evaluation_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalArguments(**kwargs)


def test_settings_leave_out_unused_dataset_and_task_fields():
    assert set(EvalArguments().settings()) == {"eval_texts", "eval_max_tokens", "eval_max_length", "eval_stride"}
    with_tasks = EvalArguments(tasks=[harness.OWN_TASK], task_batch_size=2).settings()
    assert with_tasks["tasks"] == [harness.OWN_TASK] and "task_batch_size" not in with_tasks


def test_wikitext_label_and_card_source():
    from pilot_hf.commands.report import card_results

    args = EvalArguments(eval_dataset_name="wikitext", eval_dataset_config_name="wikitext-2-raw-v1")
    assert args.dataset_label == "wikitext-2-raw-v1" and args.eval_texts == []
    sparse = {"wikitext-2-raw-v1": {"perplexity": 30.0, "source": args.dataset_source()}}
    (entry,) = card_results({"wikitext-2-raw-v1": {"perplexity": 20.0}}, sparse)
    assert entry == {"dataset": "wikitext", "dataset_name": "wikitext", "dataset_config": "wikitext-2-raw-v1",
                     "split": "test", "sparse_perplexity": 30.0, "dense_perplexity": 20.0}


def test_oneshot_cli_writes_tasks_to_metrics_card_and_figure(tmp_path):
    """End to end, offline: `pilot-hf oneshot --tasks pilot_kjv_next_verse --eval_file ...` on a tiny model."""
    from huggingface_hub import ModelCard

    folder = tmp_path / "model"
    tokenizer = byte_tokenizer()
    byte_model(context=512).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(f"Line {i}: a small held-out text about foxes and dogs." for i in range(60)))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "pilot_hf", "oneshot", "--model_name_or_path", str(folder),
                          "--method", "magnitude", "--sparsity", "0.5", "--eval_file", str(text), "--eval_seqlen",
                          "128", "--tasks", harness.OWN_TASK, "--task_limit", "12", "--output_dir", str(out)],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"| {harness.OWN_TASK} | acc |" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    sparse_tasks = metrics["tasks"]["sparse"]
    assert sparse_tasks["harness_version"] == harness.harness_version()
    assert sparse_tasks["tasks"][harness.OWN_TASK]["samples"] == 12
    assert metrics["sparse"]["heldout"]["source"]["file"] is True
    card = ModelCard.load(out / "README.md")
    by_metric = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    acc = by_metric[(harness.OWN_TASK, "acc")]
    assert acc.metric_value == pytest.approx(sparse_tasks["tasks"][harness.OWN_TASK]["acc"])
    assert acc.source_name == f"lm-evaluation-harness {harness.harness_version()}"
    assert by_metric[("heldout (local file)", "perplexity")].metric_value == \
        pytest.approx(metrics["sparse"]["heldout"]["perplexity"])
    assert "| Task | Metric | Shots |" in card.text and "![Sparsity of each pruned layer" in card.text
    pytest.importorskip("matplotlib")
    assert (out / "sparsity_layers.png").stat().st_size > 1000


def test_sparsity_grid_is_blocks_by_projections():
    from pilot_hf.card import sparsity_grid

    layers = {f"model.layers.{b}.{p}": {"sparsity": b / 10 + i / 100}
              for b in range(3) for i, p in enumerate(["self_attn.q_proj", "mlp.down_proj"])}
    layers["lm_head"] = {"sparsity": 0.5}
    rows, columns, grid = sparsity_grid({"layers": layers, "total": {"sparsity": 0.1}})
    assert rows == ["0", "1", "2", "lm_head"] and columns == ["self_attn.q_proj", "mlp.down_proj", ""]
    assert grid[2][1] == pytest.approx(0.21) and grid[3] == [None, None, 0.5] and grid[0][2] is None


def test_figure_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, caplog):
    from pilot_hf.card import write_model_card

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    report = {"layers": {"model.layers.0.mlp.up_proj": {"shape": [4, 4], "numel": 16, "zeros": 8, "sparsity": 0.5}},
              "total": {"numel": 16, "zeros": 8, "sparsity": 0.5}}
    with caplog.at_level("INFO", logger="pilot_hf.card"):
        path = write_model_card(tmp_path, {"base_model": "org/base", "sparsity_report": report})
    assert path.is_file() and not (tmp_path / "sparsity_layers.png").exists()
    assert "matplotlib is not installed" in caplog.text and "![Sparsity" not in path.read_text()


def test_sweep_table_has_task_columns(tmp_path):
    from pilot_hf.sweep import write_tables

    results = [{"method": m, "sparsity": "0.5", "pattern": "unstructured", "actual_sparsity": 0.5, "time_s": 1.0,
                "perplexity": {"kjv": p}, "tasks": {"a": {"acc": a1}, "b": {"acc": a2, "acc_norm": 0.3}},
                "task_eval_s": 12.5} for m, p, a1, a2 in [("dense", 10.0, 0.5, 0.25), ("wanda", 20.0, 0.4, 0.3)]]
    write_tables(results, tmp_path)
    header, dense = (tmp_path / "results.md").read_text().splitlines()[0], \
        (tmp_path / "results.md").read_text().splitlines()[2]
    assert "| ppl_kjv | acc_a | acc_b | acc_mean | task_eval_s |" in header
    assert "| 10.000 | 50.00 | 25.00 | 37.50 | 12.5 |" in dense


def test_harness_is_optional(tmp_path):
    """Without lm_eval, pilot_hf imports and --tasks says how to install the harness."""
    code = ("import sys; sys.modules['lm_eval'] = None; import pilot_hf; from pilot_hf.harness import check_tasks\n"
            "try:\n    check_tasks(['arc_easy'])\nexcept ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pilot-hf[eval]'" in out.stdout


def test_sweep_scores_tasks_per_cell_and_refuses_to_mix_task_settings(tmp_path):
    from pilot_hf import sweep as S
    from pilot_hf.data import DataArguments
    from pilot_hf.loading import ModelArguments
    from pilot_hf.runs import OutputError
    from pilot_hf.training_args import PILoTTrainingArguments

    folder = tmp_path / "model"
    byte_model(context=1024).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)

    def run(limit):
        ev = EvalArguments(eval_texts=["pydoc"], eval_max_tokens=256, eval_max_length=64,
                           tasks=[harness.OWN_TASK], task_limit=limit)
        targs = PILoTTrainingArguments(output_dir=str(tmp_path / "sweep"), max_steps=2, report_to="none",
                                       use_cpu=True, num_calibration_samples=2)
        return S.sweep(ModelArguments(model_name_or_path=str(folder)),
                       DataArguments(dataset_name="builtin:pydoc", block_size=32, validation_split_percentage=0), ev,
                       targs, S.SweepArguments(methods=["dense", "magnitude"], sparsities=["0.5"]))

    results = run(8)
    by_method = {r["method"]: r for r in results}
    direct, _ = harness.evaluate_tasks(byte_model(context=1024), byte_tokenizer(), [harness.OWN_TASK], limit=8)
    assert by_method["dense"]["tasks"][harness.OWN_TASK] == {
        k: direct.tasks[harness.OWN_TASK][k] for k in ("acc", "acc_norm")}
    assert by_method["magnitude"]["task_results"]["tasks"][harness.OWN_TASK]["samples"] == 8
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert f"acc_{harness.OWN_TASK}" in table and "task_eval_s" in table
    with pytest.raises(OutputError, match="task_limit"):
        run(4)
