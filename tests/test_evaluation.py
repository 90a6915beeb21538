"""pilot_hf.evaluation: sliding-window perplexity against direct computations, and the `evaluate` metric."""

import math

import datasets
import evaluate
import pytest
import torch
import transformers as T
from conftest import byte_tokenizer, tiny_inputs, tiny_model

from pilot_hf import data as D
from pilot_hf.evaluation import PERPLEXITY_METRIC_PATH, heldout_perplexity, perplexity, sliding_windows

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs.",
         "Sphinx of black quartz, judge my vow! " * 2]


def direct_nll(model, ids, max_length, stride):
    """Sum and count of -log p(token | its window's earlier tokens) over the tokens each window is
    responsible for (the Transformers recipe), one window at a time with full logits."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        with torch.no_grad():
            log_probs = model(ids[None, begin:end]).logits[0].double().log_softmax(-1)
        scored = torch.arange(max(previous_end, begin + 1), end)  # token j is predicted at position j-1-begin
        total -= log_probs[scored - 1 - begin, ids[scored]].sum().item()
        count += len(scored)
        previous_end = end
        if end == len(ids):
            break
    return total, count


def make_byte_model():
    """A tiny Llama over byte_tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def byte_model():
    return make_byte_model()


@pytest.mark.parametrize("max_length, stride", [(64, 64), (60, 60), (64, 16), (50, 7), (100, 37), (301, 301), (301, 1)])
def test_sliding_window_matches_direct_computation(max_length, stride):
    model, ids = tiny_model("llama"), tiny_inputs(1, 301)[0]
    total, count = direct_nll(model, ids, max_length, stride)
    result = perplexity(model, ids, max_length=max_length, stride=stride, progress=False)
    assert result.tokens_scored == count
    assert result.nll == pytest.approx(total / count, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)
    assert result.windows == len(sliding_windows(301, max_length, stride))


def test_overlapping_windows_score_every_token_but_the_first_once():
    for n, max_length, stride in [(301, 64, 16), (300, 100, 100), (64, 64, 1), (1000, 128, 50)]:
        scored = [j for _, end, first in sliding_windows(n, max_length, stride) for j in range(first, end)]
        assert scored == list(range(1, n)) or stride == max_length
    assert sliding_windows(300, 100, 100) == [(0, 100, 1), (100, 200, 101), (200, 300, 201)]
    assert sliding_windows(301, 100, 100) == sliding_windows(300, 100, 100)  # [300, 301) would score nothing


def test_stride_equal_max_length_is_the_mean_nll_of_non_overlapping_chunks():
    model, ids = tiny_model("llama"), tiny_inputs(1, 250)[0]
    losses, counts = [], []
    for begin in range(0, 250, 64):  # chunks of 64, 64, 64, 58 tokens
        chunk = ids[None, begin:begin + 64]
        with torch.no_grad():
            losses.append(model(chunk, labels=chunk).loss.item())  # mean over len - 1 predicted tokens
        counts.append(chunk.shape[1] - 1)
    result = perplexity(model, ids, max_length=64, progress=False)  # stride defaults to max_length
    assert (result.stride, result.tokens_scored) == (64, sum(counts))
    assert result.nll == pytest.approx(sum(l * c for l, c in zip(losses, counts)) / sum(counts), rel=1e-6)


def test_batched_equals_unbatched(arch):
    model, ids = tiny_model(arch), tiny_inputs(1, 290)[0]
    one = perplexity(model, ids, max_length=64, stride=24, batch_size=1, progress=False)
    for batch_size in (3, 16):
        many = perplexity(model, ids, max_length=64, stride=24, batch_size=batch_size, progress=False)
        assert many.tokens_scored == one.tokens_scored == 289
        assert many.nll == pytest.approx(one.nll, rel=1e-6)


class FullLogitsOnly(torch.nn.Module):
    """A model whose forward has no `logits_to_keep`: perplexity must slice the full logits itself."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=use_cache)


def test_models_without_logits_to_keep_give_the_same_result():
    model, ids = tiny_model("gpt2"), tiny_inputs(1, 200)[0]
    for stride in (16, 64):
        expected = perplexity(model, ids, max_length=64, stride=stride, batch_size=2, progress=False)
        got = perplexity(FullLogitsOnly(model), ids, max_length=64, stride=stride, batch_size=2, progress=False)
        assert got.nll == pytest.approx(expected.nll, rel=1e-6)


def test_every_input_form_is_the_same_token_stream(byte_model):
    tok = byte_tokenizer()
    stream = [t for d in TEXTS for t in tok(d)["input_ids"] + [1]]
    kwargs = {"max_length": 48, "stride": 16, "progress": False}
    expected = perplexity(byte_model, torch.tensor(stream), **kwargs).nll
    as_dataset = datasets.Dataset.from_dict({"text": TEXTS})
    for data in (stream, torch.tensor([stream]), TEXTS, as_dataset, D.tokenize_documents(as_dataset, tok)):
        assert perplexity(byte_model, data, tok, **kwargs).nll == pytest.approx(expected, rel=1e-9)
    text = " ".join(TEXTS)  # one continuous text: BOS, no EOS
    assert perplexity(byte_model, text, tok, **kwargs).nll == pytest.approx(
        perplexity(byte_model, tok(text)["input_ids"], **kwargs).nll, rel=1e-9)


def test_restores_the_training_mode_and_tracks_no_gradients():
    model = tiny_model("llama").train()
    result = perplexity(model, tiny_inputs(1, 100)[0], max_length=50, progress=False)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert result.elapsed_s > 0 and result.tokens_per_s == pytest.approx(result.tokens_scored / result.elapsed_s)


def test_metric_module_returns_the_library_number(byte_model):
    tok = byte_tokenizer()
    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    got = metric.compute(predictions=TEXTS, model=byte_model, tokenizer=tok, max_length=64, stride=32, batch_size=2)
    expected = perplexity(byte_model, TEXTS, tok, max_length=64, stride=32, batch_size=2, progress=False)
    assert got["perplexity"] == expected.perplexity and got["nll"] == expected.nll
    assert (got["tokens_scored"], got["windows"]) == (expected.tokens_scored, expected.windows)


def test_heldout_perplexity_scores_each_evaluation_text(byte_model):
    results = heldout_perplexity(byte_model, byte_tokenizer(), names=("pydoc",), max_tokens=300,
                                 max_length=100, progress=False)
    assert list(results) == ["pydoc"] and results["pydoc"].tokens_scored == 297  # 3 windows, 99 each
    ids = D.evaluation_tokens("pydoc", byte_tokenizer(), max_tokens=300)
    assert results["pydoc"].nll == perplexity(byte_model, ids, max_length=100, progress=False).nll


def test_packed_blocks_train_with_trainer_and_its_eval_loss_is_our_nll(tmp_path, monkeypatch):
    byte_model = make_byte_model()  # trained here: not the shared fixture
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    args = D.DataArguments(dataset_name="builtin:pydoc", block_size=64, max_train_samples=8, max_eval_samples=8)
    blocks = D.prepare_lm_datasets(args, byte_tokenizer(), model=byte_model)
    training = T.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                   per_device_eval_batch_size=8, report_to=[], use_cpu=True, save_strategy="no")
    trainer = T.Trainer(model=byte_model, args=training, train_dataset=blocks["train"],
                        eval_dataset=blocks["validation"])
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]  # one batch of 8 blocks: mean NLL of 8 x 63 tokens
    ours = perplexity(byte_model, blocks["validation"], max_length=64, progress=False)
    assert ours.tokens_scored == 8 * 63 and ours.nll == pytest.approx(eval_loss, rel=1e-5)


# --- errors ---------------------------------------------------------------------------------------------

def test_text_shorter_than_one_window():
    with pytest.raises(ValueError, match=r"has 40 tokens, fewer than one window of max_length=64; lower "
                                         r"max_length to at most 40"):
        perplexity(tiny_model("llama"), tiny_inputs(1, 40)[0], max_length=64, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 64, "stride": 65}, r"stride must be in \[1, max_length=64\]"),
    ({"max_length": 64, "stride": 0}, r"stride must be in"),
    ({"max_length": 512}, r"max_length=512 exceeds the model's context \(max_position_embeddings=128\)"),
    ({"max_length": 64, "batch_size": 0}, "batch_size must be at least 1"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_model("gpt2"), tiny_inputs(1, 200)[0], progress=False, **kwargs)


def test_invalid_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"one 1-D integer stream .* got shape \(2, 100\)"):
        perplexity(model, tiny_inputs(2, 100), max_length=50)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(model, "some text", max_length=50)


@pytest.mark.slow
def test_smollm2_perplexity_on_held_out_texts():
    """The real model: plausible perplexities, and batching changes nothing (run under flock)."""
    from pilot_hf.assets import load_demo_model

    model, tok = load_demo_model()
    results = heldout_perplexity(model, tok, max_tokens=1024, max_length=512, batch_size=2, progress=False)
    for name, result in results.items():
        print(name, result)
        assert result.tokens_scored == 2 * 511 and 3 < result.perplexity < 60, (name, result)
    one = perplexity(model, D.evaluation_tokens("kjv", tok, max_tokens=1024), max_length=512, progress=False)
    assert one.nll == pytest.approx(results["kjv"].nll, rel=1e-4)
