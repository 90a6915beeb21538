"""Data: text datasets -> token blocks for a Trainer, calibration samples, held-out evaluation text.

The pipeline is Transformers' `run_clm.py` recipe: load raw text -> tokenize each document -> concatenate
the documents, each followed by EOS -> cut the stream into blocks of `block_size` tokens. Every step is a
`datasets` transform, so unchanged data is read back from the datasets cache instead of re-tokenized
(the cache key is the fingerprint of the data, the tokenizer and the arguments).

Where text comes from (`DataArguments`):
- `dataset_name`: a Hub dataset id (or anything `datasets.load_dataset` takes), or a built-in offline text
  written `builtin:<name>` (`builtin:kjv`, `builtin:pydoc`, `builtin:pyguide`, `builtin:devil`; see `pilot_hf.assets`).
  The prefix keeps built-in names apart from Hub dataset names.
- `train_file` / `validation_file`: local `.txt`, `.json`/`.jsonl`, `.csv` or `.parquet` files, read by
  the `datasets` builder of that format. A `.txt` file is cut into documents by `sample_by` (default:
  blank-line separated paragraphs).
- Validation text: `validation_file`, else the dataset's `validation_split_name` split, else the first
  `validation_split_percentage` % of the training rows (deterministic, as in `run_clm.py`).

Token conventions: each document is tokenized as the tokenizer does by default (so it starts with BOS if
the tokenizer adds one, as Llama's does) and is followed by EOS. Packing concatenates all documents of a
split and drops only the final remainder of fewer than `block_size` tokens; blocks may span documents.

Built-in texts are split once into disjoint character ranges, so training and calibration text never
overlap evaluation text: `train` is the first 90% (cut at the next paragraph or line break) and `test` is
the rest, without its paragraphs of 40+ characters that also occur verbatim in `train` (pydoc's topics
repeat some paragraphs). `DataArguments(dataset_name="builtin:kjv")` trains on `train`;
`evaluation_tokens("kjv", tokenizer)` returns `test`. The `train` range is served as rows of about 8,000
characters cut at paragraph or line breaks (so it can be split and shuffled); each row is a document,
so EOS appears about every 2,000 tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .assets import TEXT_SOURCES, builtin_text

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
HELD_OUT_FRACTION = 0.1  # share of each built-in text (its tail) kept for evaluation only
EVALUATION_TEXTS = ("kjv", "pydoc", "pyguide", "devil", "perldoc", "fortunes")  # built-in texts with a held-out part, for benchmarks
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_ROW_CHARS = 8_000  # built-in text rows (documents) are about this long
_MIN_DUPLICATE_CHARS = 40  # held-out paragraphs at least this long are dropped if they also occur in train


@dataclass
class DataArguments:
    """Which text to train and validate on, and how to cut it into blocks (names as in `run_clm.py`)."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "A dataset for `datasets.load_dataset` (Hub id or local folder), or a built-in offline text: "
                f"{', '.join(BUILTIN_PREFIX + n for n in TEXT_SOURCES)}."})
    dataset_config_name: str | None = field(default=None, metadata={
        "help": "The configuration of `dataset_name` (e.g. 'wikitext-2-raw-v1'); not for built-in texts."})
    dataset_split: str = field(default="train", metadata={
        "help": "The split of `dataset_name` to train on. Built-in texts have 'train' and the held-out 'test'."})
    validation_split_name: str = field(default="validation", metadata={
        "help": "The split of `dataset_name` to validate on; when it does not exist (and no validation_file "
                "is given) the first validation_split_percentage % of the training rows are used."})
    text_column: str = field(default="text", metadata={"help": "The column holding the text of a document."})
    train_file: str | None = field(default=None, metadata={
        "help": f"A local training file ({', '.join(FILE_BUILDERS)}), instead of dataset_name."})
    validation_file: str | None = field(default=None, metadata={
        "help": f"A local validation file ({', '.join(FILE_BUILDERS)})."})
    sample_by: str = field(default="paragraph", metadata={
        "help": "How a .txt file is cut into documents: 'paragraph' (blank-line separated), 'line' or "
                "'document' (the whole file), as in the `datasets` text builder."})
    block_size: int | None = field(default=None, metadata={
        "help": "Tokens per training block. Default: the model's context (max_position_embeddings), at most 1024."})
    validation_split_percentage: float = field(default=5.0, metadata={
        "help": "Percent of the training rows (the first ones) used for validation when the data has no "
                "validation split; 0 means no validation set."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first this many training blocks (for quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first this many validation blocks (for quick runs)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes for tokenization (`datasets.map(num_proc=...)`)."})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Re-tokenize and re-pack even if the datasets cache holds the result."})
    dataset_cache_dir: str | None = field(default=None, metadata={
        "help": "Where datasets keeps downloaded and processed (tokenized, packed) data. "
                "Default: the datasets cache (HF_DATASETS_CACHE)."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("no training text: give dataset_name (a Hub dataset or a built-in text such as "
                             f"'{BUILTIN_PREFIX}kjv') or train_file (a local file).")
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError(f"give dataset_name ({self.dataset_name!r}) or train_file ({self.train_file!r}), "
                             "not both.")
        if self.builtin_name is not None:
            if self.builtin_name not in TEXT_SOURCES:
                raise ValueError(f"unknown built-in text {self.dataset_name!r}; choose one of "
                                 f"{[BUILTIN_PREFIX + n for n in TEXT_SOURCES]}.")
            if self.dataset_config_name is not None:
                raise ValueError(f"built-in texts have no configurations; drop dataset_config_name="
                                 f"{self.dataset_config_name!r}.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and _file_extension(path) not in FILE_BUILDERS:
                raise ValueError(f"{name}={path!r} has an unsupported extension; use one of "
                                 f"{sorted(FILE_BUILDERS)}.")
        if self.sample_by not in ("paragraph", "line", "document"):
            raise ValueError(f"sample_by must be 'paragraph', 'line' or 'document', got {self.sample_by!r}.")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 tokens (one to predict from, one to predict), "
                             f"got {self.block_size}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(f"validation_split_percentage must be in [0, 100), got "
                             f"{self.validation_split_percentage}.")
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}.")

    def check_sources(self) -> None:
        """Cheap checks that the text can be read, before any model is loaded (ValueError says how to fix)."""
        if self.builtin_name is not None:
            check_builtin_available(self.builtin_name)
        for name in ("train_file", "validation_file"):
            if getattr(self, name) is not None:
                check_text_file(getattr(self, name), name)

    @property
    def builtin_name(self) -> str | None:
        """The built-in text's short name ('kjv') if dataset_name is 'builtin:kjv', else None."""
        if self.dataset_name is not None and self.dataset_name.startswith(BUILTIN_PREFIX):
            return self.dataset_name[len(BUILTIN_PREFIX):]
        return None


# --- built-in texts ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _source_text(name: str) -> str:
    return builtin_text(name)


def check_builtin_available(name: str) -> None:
    """ValueError (with the install command) if the built-in text `name` cannot be read here."""
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in TEXT_SOURCES:
        raise ValueError(f"unknown built-in text {name!r}; choose one of {sorted(TEXT_SOURCES)}.")
    try:
        _source_text(name)
    except (FileNotFoundError, RuntimeError, OSError) as err:
        raise ValueError(f"the built-in text {name!r} is not available: {err}") from None


def check_text_file(path: str, what: str = "data file") -> None:
    """ValueError unless `path` is an existing, non-empty UTF-8 text file (json/csv/txt) or a parquet file."""
    if not os.path.exists(path):
        raise ValueError(f"{what} {path!r} does not exist; give the path of an existing file.")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file.")
    if _file_extension(path) == ".parquet":
        return
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if b"\0" in head:
        raise ValueError(f"{what} {path!r} is binary (it contains NUL bytes), not text; give a UTF-8 text file.")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if len(head) < (1 << 20) or err.start < len(head) - 4:  # not just a character cut at the read limit
            raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, "
                             "e.g. `iconv -f latin1 -t utf-8`.") from None
        text = head[:err.start].decode("utf-8")
    if not text.strip():
        raise ValueError(f"{what} {path!r} is empty (or only whitespace); give a file with text in it.")
    if _file_extension(path) in (".json", ".jsonl"):
        check_json_records(path, what)


def check_json_records(path: str, what: str = "data file") -> None:
    """ValueError naming the first line that is no JSON object, unless the file is one JSON document or JSON
    Lines (one object per line) — the two layouts the `datasets` json builder reads."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if _file_extension(path) == ".json":
        try:
            json.loads(text)
            return
        except ValueError:
            pass  # maybe JSON Lines in a .json file
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{what} {path!r}: line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                             "each line of a JSON Lines file must be one JSON object, e.g. {\"text\": \"...\"}. Fix "
                             "or remove that line.") from None
        if not isinstance(record, dict):
            raise ValueError(f"{what} {path!r}: line {number} is a JSON {type(record).__name__}, not an object; each "
                             "line must be one JSON object, e.g. {\"text\": \"...\"}.")


def _break_after(text: str, position: int) -> int:
    """The end of the first paragraph break (else line break) at or after `position`; len(text) if none."""
    for separator in ("\n\n", "\n"):
        found = text.find(separator, position)
        if found != -1:
            return found + len(separator)
    return len(text)


def builtin_split(name: str, split: str) -> str:
    """The 'train' or held-out 'test' part of a built-in text (disjoint character ranges; module docstring)."""
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in TEXT_SOURCES:
        raise ValueError(f"unknown built-in text {name!r}; choose one of {sorted(TEXT_SOURCES)}.")
    if split not in ("train", "test"):
        raise ValueError(f"built-in texts have the splits 'train' and 'test' (held out), not {split!r}.")
    text = _source_text(name)
    cut = _break_after(text, int((1 - HELD_OUT_FRACTION) * len(text)))
    if split == "train":
        return text[:cut]
    seen = set(text[:cut].split("\n\n"))
    kept = [p for p in text[cut:].split("\n\n") if len(p) < _MIN_DUPLICATE_CHARS or p not in seen]
    return "\n\n".join(kept)


def _builtin_rows(name: str, split: str, row_chars: int, source_sha1: str):
    text = builtin_split(name, split)
    start = 0
    while start < len(text):
        end = _break_after(text, start + row_chars)
        yield {"text": text[start:end]}
        start = end


def _builtin_dataset(name: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    # from_generator writes Arrow files into the datasets cache, keyed by gen_kwargs: later transforms are
    # cached too. The text's hash and the row size are in the key so a change of either rebuilds it.
    source_sha1 = hashlib.sha1(_source_text(name).encode()).hexdigest()
    return datasets.Dataset.from_generator(
        _builtin_rows, cache_dir=cache_dir,
        gen_kwargs={"name": name, "split": split, "row_chars": _ROW_CHARS, "source_sha1": source_sha1})


# --- raw text ------------------------------------------------------------------------------------------

def _file_extension(path: str) -> str:
    return os.path.splitext(str(path))[1].lower()


def _load_file(path: str, args: DataArguments) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path!r} is empty.")
    builder = FILE_BUILDERS[_file_extension(path)]
    kwargs = {"sample_by": args.sample_by} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files={"train": path}, split="train",
                                        cache_dir=args.dataset_cache_dir, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, ValueError) as err:
        cause = err.__cause__ or err
        raise ValueError(f"data file {path!r} cannot be read as {builder} ({type(cause).__name__}: "
                         f"{' '.join(str(cause).split())[:300]}); fix the file or convert it.") from None
    if len(dataset) == 0:
        raise ValueError(f"data file {path!r} holds no rows.")
    return dataset


def _check_text_column(dataset: datasets.Dataset, column: str, what: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(f"{what} has no text column {column!r}; its columns are {dataset.column_names}. "
                         "Set text_column to the one that holds the text.")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"column {column!r} of {what} holds {feature}, not text.")


def load_text_datasets(args: DataArguments) -> datasets.DatasetDict:
    """Raw text splits 'train' and (unless there is no validation text) 'validation'.

    Sources, validation rules and built-in texts: see the module docstring.
    """
    splits = {}
    if args.builtin_name is not None:
        if args.dataset_split not in ("train", "test"):
            raise ValueError(f"built-in texts have the splits 'train' and 'test', not {args.dataset_split!r}.")
        splits["train"] = _builtin_dataset(args.builtin_name, args.dataset_split, args.dataset_cache_dir)
        if args.validation_split_name in ("train", "test") and args.validation_split_name != args.dataset_split:
            splits["validation"] = _builtin_dataset(args.builtin_name, args.validation_split_name,
                                                    args.dataset_cache_dir)
    elif args.dataset_name is not None:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name,
                                       cache_dir=args.dataset_cache_dir)
        if args.dataset_split not in loaded:
            raise ValueError(f"dataset {args.dataset_name!r} has no split {args.dataset_split!r}; its splits "
                             f"are {list(loaded)}.")
        splits["train"] = loaded[args.dataset_split]
        if args.validation_split_name in loaded and args.validation_split_name != args.dataset_split:
            splits["validation"] = loaded[args.validation_split_name]
    else:
        splits["train"] = _load_file(args.train_file, args)
    if args.validation_file is not None:
        splits["validation"] = _load_file(args.validation_file, args)
    if "validation" not in splits and args.validation_split_percentage > 0:
        train = splits["train"]
        n_validation = max(1, round(len(train) * args.validation_split_percentage / 100))
        if n_validation >= len(train):
            raise ValueError(f"cannot hold out {args.validation_split_percentage}% of {len(train)} training "
                             "rows for validation and keep any for training; give a validation_file or "
                             "more data, or set validation_split_percentage=0.")
        splits["validation"] = train.select(range(n_validation))
        splits["train"] = train.select(range(n_validation, len(train)))
    source = args.dataset_name or args.train_file
    for split, dataset in splits.items():
        _check_text_column(dataset, args.text_column, f"the {split} data ({source})")
    return datasets.DatasetDict(splits)


# --- tokens --------------------------------------------------------------------------------------------

def _eos_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token, which separates "
                         "documents; set tokenizer.eos_token (e.g. to its end-of-text token).")
    return tokenizer.eos_token_id


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each non-blank document: the tokenizer's default encoding (BOS if it adds one) + EOS."""
    eos = _eos_token_id(tokenizer)
    texts = [t for t in texts if t and not t.isspace()]
    if not texts:
        return []
    ids = tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
    return [x if x and x[-1] == eos else x + [eos] for x in ids]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of one continuous text, as the tokenizer encodes it by default (BOS if it adds one, no EOS)."""
    return tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]


def _tokenize_batch(batch: dict, tokenizer, text_column: str) -> dict:
    return {"input_ids": encode_documents(tokenizer, batch[text_column])}


def tokenize_documents(dataset: datasets.Dataset, tokenizer, text_column: str = "text",
                       num_proc: int | None = None, load_from_cache_file: bool = True) -> datasets.Dataset:
    """One row of `input_ids` per non-blank document (BOS if the tokenizer adds one, then EOS). Cached."""
    _eos_token_id(tokenizer)
    _check_text_column(dataset, text_column, "the dataset")
    return dataset.map(_tokenize_batch, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       fn_kwargs={"tokenizer": tokenizer, "text_column": text_column},
                       load_from_cache_file=load_from_cache_file, desc="Tokenizing")


def token_stream(dataset: datasets.Dataset) -> np.ndarray:
    """All `input_ids` of a tokenized (or packed) dataset, concatenated in row order (int64)."""
    table = dataset.select_columns(["input_ids"]).with_format("arrow")[:]
    return pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int64, copy=False)


def _pack_batch(table: pa.Table, block_size: int) -> dict:
    stream = pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int64, copy=False)
    blocks = stream[: len(stream) // block_size * block_size].reshape(-1, block_size)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()}


def pack_blocks(tokenized: datasets.Dataset, block_size: int, load_from_cache_file: bool = True
                ) -> datasets.Dataset:
    """Concatenate all documents and cut the stream into blocks of `block_size` tokens. Cached.

    Columns: input_ids, attention_mask (ones), labels (= input_ids; the model shifts them). Only the final
    remainder (< block_size tokens) is dropped. The whole split is one batch, so no other tokens are lost.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    packed = tokenized.with_format("arrow").map(
        _pack_batch, batched=True, batch_size=None, remove_columns=tokenized.column_names,
        fn_kwargs={"block_size": block_size}, load_from_cache_file=load_from_cache_file,
        desc=f"Packing into blocks of {block_size}")
    return packed.with_format(None)


def _model_context(model) -> int | None:
    config = getattr(model, "config", model)
    return getattr(config, "max_position_embeddings", None)


def prepare_lm_datasets(args: DataArguments, tokenizer, model=None) -> datasets.DatasetDict:
    """Token blocks ready for a causal-LM `Trainer`: splits 'train' and (if any) 'validation'.

    `model` (a model or its config) sets the default block size and bounds it by max_position_embeddings.
    """
    _eos_token_id(tokenizer)
    context = _model_context(model) if model is not None else None
    block_size = args.block_size if args.block_size is not None else min(1024, context or 1024)
    if context is not None and block_size > context:
        raise ValueError(f"block_size={block_size} exceeds the model's context (max_position_embeddings="
                         f"{context}); lower block_size to at most {context}.")
    raw = load_text_datasets(args)
    cached = not args.overwrite_cache
    result = {}
    for split, dataset in raw.items():
        tokenized = tokenize_documents(dataset, tokenizer, args.text_column, args.preprocessing_num_workers,
                                       load_from_cache_file=cached)
        blocks = pack_blocks(tokenized, block_size, load_from_cache_file=cached)
        if len(blocks) == 0:
            n_tokens = len(token_stream(tokenized))
            raise ValueError(f"the {split} data has {n_tokens} tokens, fewer than one block of block_size="
                             f"{block_size}; lower block_size or give more text.")
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        if limit is not None and limit < len(blocks):
            blocks = blocks.select(range(limit))
        logger.info("%s: %d blocks of %d tokens", split, len(blocks), block_size)
        result[split] = blocks
    return datasets.DatasetDict(result)


_DATA_FINGERPRINTS: dict[str, dict] = {}  # by the datasets fingerprint: a dataset is hashed once per process


def data_fingerprint(dataset) -> dict | None:
    """What defines packed training data, recorded in every checkpoint so that resuming on other data is refused:
    the number of blocks, the block size and a sha256 of every token id in order (it changes with the text, the
    files, the tokenizer, the block size and max_train_samples alike). None for data that is not a `datasets.Dataset`
    of `input_ids` (an iterable dataset is not read ahead)."""
    if not isinstance(dataset, datasets.Dataset) or "input_ids" not in dataset.column_names:
        return None
    key = getattr(dataset, "_fingerprint", None)
    if key not in _DATA_FINGERPRINTS:
        stream = token_stream(dataset)
        record = {"blocks": len(dataset), "block_size": len(dataset[0]["input_ids"]) if len(dataset) else 0,
                  "tokens": len(stream), "tokens_sha256": hashlib.sha256(stream.tobytes()).hexdigest()}
        if key is None:
            return record
        _DATA_FINGERPRINTS[key] = record
    return _DATA_FINGERPRINTS[key]


def check_same_data(checkpoint: str, recorded: dict | None, current: dict | None) -> None:
    """ValueError if the checkpoint was trained on other data than the run that resumes it (see data_fingerprint).
    A checkpoint written before data was recorded (None) is not compared."""
    if not recorded or not current or recorded == current:
        return
    differ = "; ".join(f"{k}: checkpoint {recorded.get(k)} vs now {current.get(k)}" for k in recorded
                       if recorded.get(k) != current.get(k) and k != "tokens_sha256")
    raise ValueError(f"cannot resume {checkpoint}: it was trained on other data ({differ or 'the same sizes'}, other "
                     "token content). Resuming would mix two data sets in one run. Resume with the checkpoint's data "
                     "(the same dataset or train_file, block_size, tokenizer and max_train_samples), or start a new "
                     "run with another --checkpoint_dir.")


def calibration_samples(tokenizer, data="builtin:kjv", num_samples: int = 128, seqlen: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """`num_samples` distinct blocks of `seqlen` training tokens, chosen with `seed`: a (num_samples, seqlen)
    LongTensor for one-shot pruning.

    `data`: a dataset_name (e.g. 'builtin:kjv', never its held-out part), a `DataArguments` (its train
    split) or a `datasets.Dataset` with a 'text' or 'input_ids' column.
    """
    if isinstance(data, datasets.Dataset):
        tokenized = data if "input_ids" in data.column_names else tokenize_documents(data, tokenizer)
    else:
        args = data if isinstance(data, DataArguments) else DataArguments(dataset_name=data,
                                                                          validation_split_percentage=0)
        raw = load_text_datasets(args)["train"]
        tokenized = tokenize_documents(raw, tokenizer, args.text_column, args.preprocessing_num_workers,
                                       load_from_cache_file=not args.overwrite_cache)
    blocks = pack_blocks(tokenized, seqlen)
    if num_samples > len(blocks):
        raise ValueError(f"the calibration text has {len(token_stream(tokenized))} tokens: {len(blocks)} "
                         f"blocks of seqlen={seqlen}, fewer than num_samples={num_samples}; lower num_samples "
                         "or seqlen, or use more text.")
    return calibration_blocks(blocks, num_samples, seed)


def calibration_blocks(dataset, num_samples: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` distinct blocks of a packed training dataset (rows of equal-length `input_ids`), chosen
    with `seed`, as a (num_samples, block_size) LongTensor: calibration data for a warm start."""
    if not hasattr(dataset, "__len__"):  # an iterable dataset: its first blocks
        rows = [row["input_ids"] for _, row in zip(range(num_samples), dataset)]
    else:
        if num_samples > len(dataset):
            raise ValueError(f"num_calibration_samples={num_samples} exceeds the {len(dataset)} training blocks; "
                             "lower it or give more training text.")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples]
        rows = [dataset[int(i)]["input_ids"] for i in order]
    if len(rows) < num_samples or len({len(r) for r in rows}) != 1:
        raise ValueError(f"calibration needs {num_samples} training blocks of one length (packed data); got "
                         f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}.")
    return torch.as_tensor(rows, dtype=torch.long)


def evaluation_tokens(name: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The held-out part of a built-in text (EVALUATION_TEXTS; 'builtin:' prefix optional) as one
    token stream (1-D LongTensor; BOS first if the tokenizer adds one), cut to `max_tokens` if given.
    """
    ids = torch.tensor(encode_text(tokenizer, builtin_split(name, "test")), dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


# --- evaluation datasets (`--eval_dataset_name`, `--eval_file`) -----------------------------------------

def check_hub_datasets(datasets_: list[tuple[str, str | None]], what: str, offline_hint: str = "") -> None:
    """ValueError (one paragraph) unless each (dataset id, config) can be read: offline (HF_HUB_OFFLINE=1)
    from the datasets cache, online from the Hub (one metadata request per dataset, 10 s timeout)."""
    from .assets import is_offline

    names = ", ".join(f"{path}" + (f" ({config})" if config else "") for path, config in datasets_)
    if is_offline():
        missing = []
        for path, config in datasets_:
            try:
                datasets.load_dataset_builder(path, config)  # offline, this only reads the cache
            except Exception:  # any failure means it cannot be read offline
                missing.append(path)
        missing = list(dict.fromkeys(missing))
        if missing:
            absent = "none of them is" if len(missing) == len({p for p, _ in datasets_}) else \
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not"
            raise ValueError(f"{what}: these read datasets from the Hugging Face Hub ({names}), but the Hub is offline "
                             f"here (HF_HUB_OFFLINE=1) and {absent} in the datasets cache. Run it where the Hub can be "
                             f"reached (or fill the datasets cache there and copy it here). {offline_hint}")
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi()
    for path, _ in datasets_:
        try:
            api.dataset_info(path, timeout=10)
        except GatedRepoError:
            raise ValueError(f"{what}: the Hub dataset {path!r} is gated; accept its terms on its Hub page and log "
                             "in (`hf auth login`), then run again.") from None
        except RepositoryNotFoundError:
            raise ValueError(f"{what}: there is no dataset {path!r} on the Hugging Face Hub; check the name (e.g. "
                             "'wikitext' with config 'wikitext-2-raw-v1').") from None
        except Exception as err:  # network errors come from several libraries
            raise ValueError(f"{what}: these read datasets from the Hugging Face Hub ({names}), and the Hub cannot be "
                             f"reached from here ({type(err).__name__}: {err}). Run it where the Hub can be reached; "
                             f"if the datasets are in your datasets cache, set HF_HUB_OFFLINE=1 to use it. "
                             f"{offline_hint}") from None


def load_eval_rows(dataset_name: str | None = None, config_name: str | None = None, split: str = "test",
                   file: str | None = None, text_column: str = "text", cache_dir: str | None = None) -> list[str]:
    """The text rows of an evaluation split: `split` of `datasets.load_dataset(dataset_name, config_name)`, or
    the rows of a local file (a .txt file is one row, the whole file; json/jsonl/csv/parquet: one per record)."""
    if (dataset_name is None) == (file is None):
        raise ValueError("give an evaluation dataset name or an evaluation file (one of them).")
    if file is not None:
        builder = FILE_BUILDERS.get(_file_extension(file))
        if builder is None:
            raise ValueError(f"eval_file {file!r} has an unsupported extension; use one of {sorted(FILE_BUILDERS)}.")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files={"test": file}, split="test", cache_dir=cache_dir,
                                        **kwargs)
        source = file
    else:
        loaded = datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir)
        if split not in loaded:
            raise ValueError(f"dataset {dataset_name!r}{f' ({config_name})' if config_name else ''} has no split "
                             f"{split!r}; its splits are {list(loaded)}. Set --eval_split.")
        dataset, source = loaded[split], f"{dataset_name} ({split})"
    _check_text_column(dataset, text_column, f"the evaluation data {source}")
    rows = dataset[text_column]
    if not any(r and not r.isspace() for r in rows):
        raise ValueError(f"the evaluation data {source} holds no text in column {text_column!r}.")
    return rows


def eval_token_stream(rows: list[str], tokenizer, convention: str = "field") -> torch.Tensor:
    """One token stream from evaluation rows. 'field': the rows joined with blank lines and tokenized once (the
    WikiText-2 convention of SparseGPT's and Wanda's evaluation code); 'documents': each non-blank row as a
    document followed by EOS, as in training (`encode_documents`)."""
    if convention == "field":
        ids = encode_text(tokenizer, "\n\n".join(rows))
    elif convention == "documents":
        ids = [t for doc in encode_documents(tokenizer, rows) for t in doc]
    else:
        raise ValueError(f"convention must be 'field' or 'documents', got {convention!r}.")
    return torch.tensor(ids, dtype=torch.long)


def teacher_sample_split(text_blocks: int, seen_blocks: int, share: float) -> tuple[int, int]:
    """(text blocks to keep, teacher blocks to sample) so that `share` of the blocks a run sees are the
    teacher's. When the run sees fewer blocks than the text has, it keeps a random subset of the text and passes
    once over the mixture; otherwise it keeps all of the text and adds teacher blocks in proportion."""
    if not 0 <= share <= 1:
        raise ValueError(f"teacher_sample_share={share!r}: must be in [0, 1].")
    text = seen_blocks - round(share * seen_blocks)
    if text <= text_blocks:
        return text, seen_blocks - text
    return text_blocks, round(share / (1 - share) * text_blocks)


def check_mixable(dataset) -> None:
    """Refuse, before any sampling, training data that teacher samples cannot be mixed into: it must be a
    datasets.Dataset of packed blocks (input_ids, and optionally attention_mask and labels)."""
    columns = set(getattr(dataset, "column_names", None) or ())
    if not isinstance(dataset, datasets.Dataset) or "input_ids" not in columns \
            or not columns <= {"input_ids", "attention_mask", "labels"}:
        raise ValueError(f"teacher_sample_share mixes the teacher's text into a datasets.Dataset of packed blocks "
                         f"(input_ids, attention_mask, labels); this training data is a {type(dataset).__name__} "
                         f"with the columns {sorted(columns)}. Pass packed blocks or teacher_sample_share=0.")


def mix_teacher_samples(dataset: datasets.Dataset, samples: list[list[int]], keep_text: int,
                        seed: int) -> datasets.Dataset:
    """Packed training blocks with teacher-written blocks mixed in: `keep_text` blocks of `dataset` (a seeded
    random subset when fewer than all) and every sample, with the same columns (labels = input_ids)."""
    check_mixable(dataset)
    columns = set(dataset.column_names)
    lengths = {len(s) for s in samples} | {len(dataset[0]["input_ids"])}
    if len(lengths) != 1:
        raise ValueError(f"teacher samples and training blocks must have one length, got {sorted(lengths)}.")
    if keep_text < len(dataset):
        rows = np.random.default_rng(seed).choice(len(dataset), size=keep_text, replace=False)
        dataset = dataset.select(np.sort(rows))
    written = {"input_ids": samples}
    if "attention_mask" in columns:
        written["attention_mask"] = [[1] * len(s) for s in samples]
    if "labels" in columns:
        written["labels"] = [list(s) for s in samples]
    teacher = datasets.Dataset.from_dict(written, features=dataset.features)
    return datasets.concatenate_datasets([dataset, teacher]) if len(dataset) else teacher
