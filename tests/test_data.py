"""pilot_hf.data: built-in text splits, tokenization, packing, caching, calibration and evaluation tokens."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import byte_tokenizer
from tokenizers import pre_tokenizers

from pilot_hf import data as D
from pilot_hf.assets import _debian_share, builtin_text


def byte_ids(text: str, bos: bool = True) -> list[int]:
    """What byte_tokenizer must produce, computed independently of it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    return ([0] if bos else []) + [alphabet.index(to_char[b]) + 2 for b in text.encode("utf-8")]


def _bytes_to_unicode():
    # GPT-2's byte -> printable character table (what ByteLevel uses).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


DOCS = ["In the beginning was the word.", "", "  ", "Short.", "A third document,\nwith two lines.",
        "Ünïcödé text — with bytes ✓", "x" * 37]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(bos=True)


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Every test of this module caches into a fresh folder, never the user's datasets cache."""
    folder = str(tmp_path_factory.mktemp("datasets_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
        yield folder


def _write(path, docs, column="text"):
    ext = path.suffix
    if ext == ".txt":
        path.write_text("\n\n".join(docs), encoding="utf-8")
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps({column: d}) + "\n" for d in docs), encoding="utf-8")
    elif ext == ".json":
        path.write_text(json.dumps([{column: d} for d in docs]), encoding="utf-8")
    elif ext == ".csv":
        pd.DataFrame({column: docs}).to_csv(path, index=False)
    elif ext == ".parquet":
        pd.DataFrame({column: docs}).to_parquet(path)
    return str(path)


# --- tokenizer conventions ------------------------------------------------------------------------------

def test_byte_tokenizer_is_what_the_tests_assume(tok):
    for text in DOCS[:1] + DOCS[5:]:
        assert tok(text)["input_ids"] == byte_ids(text)
        assert byte_tokenizer(bos=False)(text)["input_ids"] == byte_ids(text, bos=False)


@pytest.mark.parametrize("bos", [True, False])
def test_documents_are_bos_text_eos_and_blank_ones_are_dropped(bos):
    ids = D.encode_documents(byte_tokenizer(bos=bos), DOCS)
    nonblank = [d for d in DOCS if d.strip()]
    assert ids == [byte_ids(d, bos) + [1] for d in nonblank]
    assert D.encode_text(byte_tokenizer(bos=bos), DOCS[0]) == byte_ids(DOCS[0], bos)  # no EOS on one text


# --- built-in texts -------------------------------------------------------------------------------------

def _available(name):
    try:
        builtin_text(name)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("name", D.EVALUATION_TEXTS)
def test_builtin_train_and_test_are_disjoint_ranges_of_the_text(name):
    if not _available(name):
        pytest.skip(f"built-in text {name!r} is not installed (scripts/setup.sh)")
    full = builtin_text(name)
    train, test = D.builtin_split(name, "train"), D.builtin_split(f"builtin:{name}", "test")
    tail = full[len(train):]
    assert full.startswith(train) and train.endswith("\n")  # train is a prefix, cut at a line break
    assert 0.89 * len(full) < len(train) < 0.91 * len(full)
    # test is the tail minus its long paragraphs that also occur in train, in order
    train_paragraphs = set(train.split("\n\n"))
    kept = [p for p in tail.split("\n\n") if len(p) < 40 or p not in train_paragraphs]
    assert test == "\n\n".join(kept) and len(test) > 0.8 * len(tail)
    assert not any(len(p) >= 40 and p in train_paragraphs for p in test.split("\n\n"))


def test_builtin_rows_reassemble_the_train_text_exactly():
    rows = D.load_text_datasets(D.DataArguments(dataset_name="builtin:pydoc", validation_split_percentage=0))
    text = rows["train"]["text"]
    assert "".join(text) == D.builtin_split("pydoc", "train")
    assert all(len(r) >= 8_000 for r in text[:-1]) and all(r.endswith("\n") for r in text[:-1])


def test_builtin_validation_is_the_first_rows_of_train():
    args = D.DataArguments(dataset_name="builtin:pydoc", validation_split_percentage=10)
    split = D.load_text_datasets(args)
    everything = D.load_text_datasets(D.DataArguments(dataset_name="builtin:pydoc",
                                                      validation_split_percentage=0))["train"]["text"]
    n_validation = round(len(everything) * 0.1)
    assert split["validation"]["text"] == everything[:n_validation]
    assert split["train"]["text"] == everything[n_validation:]


# --- packing --------------------------------------------------------------------------------------------

def test_packing_is_deterministic_and_loses_only_the_final_remainder(tok):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), size=int(n))) for n in rng.integers(1, 60, size=50)]
    tokenized = D.tokenize_documents(datasets.Dataset.from_dict({"text": docs}), tok)
    stream = [t for d in docs if d.strip() for t in byte_ids(d) + [1]]  # blank documents are dropped
    assert D.token_stream(tokenized).tolist() == stream
    for block_size in (7, 64, len(stream)):
        blocks = D.pack_blocks(tokenized, block_size)
        n = len(stream) // block_size
        assert len(blocks) == n
        packed = np.array(blocks["input_ids"])
        assert packed.shape == (n, block_size)
        assert packed.ravel().tolist() == stream[: n * block_size]  # order kept, nothing lost but the tail
        assert len(stream) - n * block_size < block_size
        assert np.array_equal(np.array(blocks["labels"]), packed)
        assert np.all(np.array(blocks["attention_mask"]) == 1)
        assert np.array_equal(np.array(D.pack_blocks(tokenized, block_size)["input_ids"]), packed)


def test_split_and_pack_count_every_token(tok):
    args = D.DataArguments(dataset_name="builtin:pydoc", validation_split_percentage=5, block_size=100)
    raw = D.load_text_datasets(args)
    lm = D.prepare_lm_datasets(args, tok)
    total = sum(len(byte_ids(row)) + 1 for split in raw.values() for row in split["text"])
    n_bytes = len(D.builtin_split("pydoc", "train").encode("utf-8"))
    assert total == n_bytes + 2 * (len(raw["train"]) + len(raw["validation"]))  # BOS + EOS per row
    for split in ("train", "validation"):
        tokens = sum(len(byte_ids(row)) + 1 for row in raw[split]["text"])
        assert len(lm[split]) == tokens // 100
    again = D.prepare_lm_datasets(args, tok)
    assert again["validation"]["input_ids"] == lm["validation"]["input_ids"]


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_blocks(tmp_path, tok, ext):
    docs = [f"Document number {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]
    train = _write(tmp_path / f"train{ext}", docs)
    valid = _write(tmp_path / f"valid{ext}", docs[:8])
    lm = D.prepare_lm_datasets(D.DataArguments(train_file=train, validation_file=valid, block_size=32), tok)
    for split, split_docs in (("train", docs), ("validation", docs[:8])):
        stream = [t for d in split_docs for t in byte_ids(d) + [1]]
        n = len(stream) // 32
        assert np.array(lm[split]["input_ids"]).ravel().tolist() == stream[: n * 32]


def test_max_samples_keep_the_first_blocks(tmp_path, tok):
    train = _write(tmp_path / "train.jsonl", ["word " * 200] * 10)
    args = {"train_file": train, "block_size": 16}
    full = D.prepare_lm_datasets(D.DataArguments(**args), tok)
    cut = D.prepare_lm_datasets(D.DataArguments(**args, max_train_samples=3, max_eval_samples=1), tok)
    assert (len(cut["train"]), len(cut["validation"])) == (3, 1)
    assert cut["train"]["input_ids"] == full["train"]["input_ids"][:3]


def test_a_second_call_reads_the_cache_instead_of_tokenizing(tmp_path, tok, monkeypatch):
    args = D.DataArguments(dataset_name="builtin:pydoc", block_size=64, dataset_cache_dir=str(tmp_path))
    calls = []
    original = type(tok).__call__

    def counting_call(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", counting_call)
    first = D.prepare_lm_datasets(args, tok)
    assert len(calls) > 0
    calls.clear()
    second = D.prepare_lm_datasets(args, tok)
    assert calls == [] and second["train"].cache_files == first["train"].cache_files
    assert second["train"]["input_ids"][:5] == first["train"]["input_ids"][:5]
    D.prepare_lm_datasets(D.DataArguments(dataset_name="builtin:pydoc", block_size=64, overwrite_cache=True,
                                          dataset_cache_dir=str(tmp_path)), tok)
    assert len(calls) > 0


# --- calibration and evaluation ------------------------------------------------------------------------

def test_calibration_samples_are_distinct_training_blocks_chosen_by_seed(tok):
    samples = D.calibration_samples(tok, "builtin:pydoc", num_samples=8, seqlen=128, seed=3)
    assert samples.shape == (8, 128) and samples.dtype == torch.long
    assert torch.equal(samples, D.calibration_samples(tok, "builtin:pydoc", num_samples=8, seqlen=128, seed=3))
    assert not torch.equal(samples, D.calibration_samples(tok, "builtin:pydoc", num_samples=8, seqlen=128, seed=4))
    rows = D.load_text_datasets(D.DataArguments(dataset_name="builtin:pydoc", validation_split_percentage=0))
    stream = torch.tensor([t for row in rows["train"]["text"] for t in byte_ids(row) + [1]])
    blocks = stream[: len(stream) // 128 * 128].view(-1, 128)
    indices = [int(torch.nonzero((blocks == s).all(dim=1))[0]) for s in samples]
    assert len(set(indices)) == 8  # each sample is one whole block, none twice


def test_evaluation_tokens_are_the_held_out_text(tok):
    ids = D.evaluation_tokens("pydoc", tok)
    assert ids.dtype == torch.long and ids.tolist() == byte_ids(D.builtin_split("pydoc", "test"))
    assert torch.equal(D.evaluation_tokens("builtin:pydoc", tok, max_tokens=100), ids[:100])


# --- errors ---------------------------------------------------------------------------------------------

def test_missing_text_column_names_the_columns(tmp_path, tok):
    train = _write(tmp_path / "train.jsonl", ["a b c"] * 5, column="content")
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['content'\]"):
        D.prepare_lm_datasets(D.DataArguments(train_file=train), tok)
    lm = D.prepare_lm_datasets(D.DataArguments(train_file=train, text_column="content", block_size=4,
                                               validation_split_percentage=20), tok)
    assert len(lm["train"]) == 4 * len(byte_ids("a b c") + [1]) // 4  # 4 training rows, 1 for validation


def test_empty_file(tmp_path, tok):
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        D.load_text_datasets(D.DataArguments(train_file=str(tmp_path / "train.txt")))


def test_block_size_beyond_the_model_context(tok):
    config = T.LlamaConfig(max_position_embeddings=256)
    with pytest.raises(ValueError, match=r"block_size=512 exceeds .*max_position_embeddings=256"):
        D.prepare_lm_datasets(D.DataArguments(dataset_name="builtin:pydoc", block_size=512), tok, model=config)


def test_block_size_beyond_the_data(tmp_path, tok):
    train = _write(tmp_path / "train.jsonl", ["tiny"] * 4)
    with pytest.raises(ValueError, match=r"the train data has 24 tokens, fewer than one block of block_size=64"):
        D.prepare_lm_datasets(D.DataArguments(train_file=train, block_size=64, validation_split_percentage=0), tok)


def test_tokenizer_without_eos(tok):
    with pytest.raises(ValueError, match="no EOS token"):
        D.prepare_lm_datasets(D.DataArguments(dataset_name="builtin:pydoc"), byte_tokenizer(eos=False))


def test_unsupported_extension(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported extension; use one of \['.csv'"):
        D.DataArguments(train_file=str(tmp_path / "train.xml"))


def test_no_training_text():
    with pytest.raises(ValueError, match="give dataset_name .* or train_file"):
        D.DataArguments()


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset_name": "builtin:nope"}, "unknown built-in text 'builtin:nope'"),
    ({"dataset_name": "builtin:kjv", "train_file": "a.txt"}, "not both"),
    ({"dataset_name": "builtin:kjv", "block_size": 1}, "block_size must be at least 2"),
    ({"dataset_name": "builtin:kjv", "validation_split_percentage": 100}, r"validation_split_percentage must be"),
    ({"dataset_name": "builtin:kjv", "max_train_samples": 0}, "max_train_samples must be a positive"),
    ({"dataset_name": "builtin:kjv", "sample_by": "word"}, "sample_by must be"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D.DataArguments(**kwargs)


def test_too_few_blocks_for_calibration(tmp_path, tok):
    train = _write(tmp_path / "train.jsonl", ["word " * 100] * 3)
    with pytest.raises(ValueError, match=r"1506 tokens: 5 blocks of seqlen=256, fewer than num_samples=6"):
        D.calibration_samples(tok, D.DataArguments(train_file=train, validation_split_percentage=0),
                              num_samples=6, seqlen=256)


def test_devil_text_is_the_book_without_the_dictd_headers():
    if not _available("devil"):
        pytest.skip("Debian's dict-devil is not unpacked (scripts/setup.sh)")
    text = builtin_text("devil")
    assert text.startswith("ABASEMENT, n.  A decent and customary mental attitude")
    assert text.rstrip().endswith("the domestic cow sheds its horn every two years.")
    assert "00-database" not in text and "dictfmt" not in text and text.count("\n") > 5_000
    # the held-out tail is the end of the alphabet, never seen in training
    assert D.builtin_split("devil", "test").lstrip().startswith(("T", "U"))


def test_a_missing_debian_text_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scripts/setup.sh does it.*`apt install no-such-doc`"):
        _debian_share("no-such-doc", "folder", str(tmp_path / "nowhere"))


def test_fortunes_and_perldoc_are_texts_of_their_own_domains():
    """Two more evaluation domains: sayings without Bierce's (devil is a text of its own) and Perl's manuals."""
    if not (_available("fortunes") and _available("perldoc")):
        pytest.skip("Debian's fortunes or perl-doc is not unpacked (scripts/setup.sh)")
    fortunes, perldoc = builtin_text("fortunes"), builtin_text("perldoc")
    assert "Bierce" not in fortunes and "Devil's Dictionary" not in fortunes and fortunes.count("\n\n") > 5_000
    assert perldoc.startswith("=") and perldoc.count("\n=head1 ") > 100 and "my $" in perldoc
    assert len(D.builtin_split("fortunes", "test")) > 100_000 and len(D.builtin_split("perldoc", "test")) > 500_000
