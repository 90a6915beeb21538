"""Evaluation: sliding-window perplexity of a causal LM, batched.

The recipe is Transformers' (https://huggingface.co/docs/transformers/perplexity): windows of `max_length`
tokens start every `stride` tokens; each window scores only the tokens no earlier window scored, with up
to `max_length - stride` tokens of overlap as context. The first token of the text (and, when
`stride == max_length`, the first token of every window) has no context and is not scored.
`stride == max_length` gives the non-overlapping chunks of the pruning literature.
The mean is over the tokens actually scored. (The doc's code weights each window's mean loss by its
target count minus one, which is exact only when the window's first token is a target; with overlapping
windows its numbers differ from ours in the 5th digit.)

The same computation is available as an `evaluate` metric: `load_perplexity_metric()`.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import (
    EVALUATION_TEXTS,
    FILE_BUILDERS,
    check_builtin_available,
    check_hub_datasets,
    check_text_file,
    encode_documents,
    encode_text,
    eval_token_stream,
    evaluation_tokens,
    load_eval_rows,
    token_stream,
)

PERPLEXITY_METRIC_PATH = str(Path(__file__).parent / "metrics" / "perplexity")
DEFAULT_MAX_LENGTH = 2048  # cap of the default window, whatever the model's context


@dataclass
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood of a scored token, in nats
    tokens_scored: int
    tokens_per_s: float  # scored tokens per second of evaluation
    elapsed_s: float
    max_length: int
    stride: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window: it reads tokens [begin, end) and scores [first_target, end)."""
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_target = max(previous_end, begin + 1)
        if first_target < end:  # a last window of one token (stride == max_length) would score nothing
            windows.append((begin, end, first_target))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def _token_ids(data, tokenizer, text_column: str) -> torch.Tensor:
    def need_tokenizer():
        if tokenizer is None:
            raise ValueError(f"perplexity of {type(data).__name__} text needs a tokenizer; pass tokenizer=.")

    if isinstance(data, str):
        need_tokenizer()
        ids = encode_text(tokenizer, data)
    elif isinstance(data, datasets.Dataset):
        if "input_ids" in data.column_names:
            ids = token_stream(data)
        elif text_column in data.column_names:
            need_tokenizer()
            ids = [t for doc in encode_documents(tokenizer, data[text_column]) for t in doc]
        else:
            raise ValueError(f"the dataset has neither 'input_ids' nor the text column {text_column!r}; its "
                             f"columns are {data.column_names}.")
    elif isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        need_tokenizer()
        ids = [t for doc in encode_documents(tokenizer, list(data)) for t in doc]
    else:
        ids = data
    ids = torch.as_tensor(np.asarray(ids) if isinstance(ids, (list, tuple)) else ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"token ids must be one 1-D integer stream (or shape (1, N)), got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}; pass several texts as a list of str.")
    return ids.long().cpu()


def _batches(windows: list, batch_size: int):
    """Consecutive windows of equal length, at most batch_size at a time (only the last window is shorter)."""
    batch = []
    for window in windows:
        if batch and (len(batch) == batch_size or window[1] - window[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ of the token cross-entropies of (N, V) logits against (N,) targets (-100: ignored), `rows` rows at a
    time, in float32 per chunk and summed in float64; a 0-dim tensor on the logits' device, so that the
    caller syncs with the host once, not once per chunk."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, len(targets), rows):
        total += F.cross_entropy(logits[i:i + rows].float(), targets[i:i + rows], ignore_index=-100,
                                 reduction="sum")
    return total


def perplexity(model, data, tokenizer=None, *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 1, device=None, progress: bool = True, text_column: str = "text"
               ) -> PerplexityResult:
    """Sliding-window perplexity of `model` on one token stream (module docstring for the recipe).

    data: token ids (1-D tensor, array or list); a str (one continuous text); a list of str (documents,
        each followed by EOS, as in training); or a `datasets.Dataset` with 'input_ids' (rows concatenated,
        e.g. packed blocks) or a `text_column`. Text needs `tokenizer`.
    max_length: window length; default the model's max_position_embeddings, at most 2048.
    stride: tokens between window starts (1..max_length); default max_length (non-overlapping windows).
    batch_size: windows per forward pass. device: where the inputs go; default the model's device.
    The model runs in eval mode under torch.inference_mode; its train/eval mode is restored afterwards.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_length is None:
        max_length = min(context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context (max_position_embeddings="
                         f"{context}); lower max_length.")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    ids = _token_ids(data, tokenizer, text_column)
    if len(ids) < max_length:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of max_length="
                         f"{max_length}; lower max_length to at most {len(ids)} or evaluate a longer text.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = sliding_windows(len(ids), max_length, stride)
    # Logits only for the positions that predict scored tokens: cheaper than a full forward when stride is
    # small (the lm_head over a large vocabulary is a big share of the cost).
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    was_training = model.training
    model.eval()
    nll_sum, tokens_scored = 0.0, 0
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=len(windows), desc="perplexity", unit="window",
                                          disable=not progress) as bar:
            for batch in _batches(windows, batch_size):
                length = batch[0][1] - batch[0][0]
                input_ids = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
                keep = max(e - f for _, e, f in batch) + 1
                kwargs = {"logits_to_keep": keep} if keep_logits else {}
                logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
                if not keep_logits:
                    logits = logits[:, length - keep:]
                # Cross-entropy in slices of 16 MiB of fp32 logits: a whole window's log-softmax (100 MB for a
                # 49k vocabulary) runs from main memory and costs ~3x more on CPU than slices that stay in cache.
                rows = max(1, (1 << 22) // logits.shape[-1])
                for row, (b, e, f) in enumerate(batch):
                    # logits at window position p predict token p + 1; the last kept position predicts nothing
                    scored = e - f
                    nll_sum += cross_entropy_sum(logits[row, keep - 1 - scored: keep - 1], input_ids[row, f - b:],
                                                 rows).item()
                    tokens_scored += scored
                bar.update(len(batch))
    finally:
        model.train(was_training)
    elapsed_s = time.perf_counter() - start
    nll = nll_sum / tokens_scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens_scored=tokens_scored,
                            tokens_per_s=tokens_scored / elapsed_s, elapsed_s=elapsed_s,
                            max_length=max_length, stride=stride, windows=len(windows))


def heldout_perplexity(model, tokenizer, names: Sequence[str] = EVALUATION_TEXTS,
                       max_tokens: int | None = None, **kwargs) -> dict[str, PerplexityResult]:
    """Perplexity on the held-out part of each built-in text (never seen by training or calibration).

    `max_tokens` cuts each text to its first tokens (faster benchmarks); kwargs go to `perplexity`.
    """
    return {name: perplexity(model, evaluation_tokens(name, tokenizer, max_tokens), **kwargs) for name in names}


EVAL_CONVENTIONS = ("field", "documents")
_DATASET_FIELDS = ("eval_dataset_name", "eval_dataset_config_name", "eval_split", "eval_file", "eval_text_column",
                   "eval_convention", "eval_seqlen")
_TASK_FIELDS = ("tasks", "num_fewshot", "task_limit", "task_include_path")


@dataclass
class EvalArguments:
    """Held-out perplexity (built-in texts, a Hub dataset or a local file) and harness tasks, before and after
    compression."""

    eval_texts: list[str] | None = field(default=None, metadata={
        "help": f"Built-in held-out texts to evaluate on ({', '.join(EVALUATION_TEXTS)}; 'none' for none); never "
                "trained on. Default: kjv and pydoc, or none when --eval_dataset_name or --eval_file is given."})
    eval_max_tokens: int | None = field(default=8192, metadata={
        "help": "Evaluate on the first N tokens of each built-in text (None: all of it); also of the evaluation "
                "dataset under --eval_convention documents."})
    eval_max_length: int = field(default=512, metadata={
        "help": "Sliding-window length (tokens) for the built-in texts (and --eval_convention documents)."})
    eval_stride: int | None = field(default=None, metadata={
        "help": "Tokens between window starts; default eval_max_length (no overlap)."})
    eval_batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    skip_dense_eval: bool = field(default=False, metadata={"help": "Do not evaluate the model before compression."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Perplexity on a dataset for `datasets.load_dataset` (a Hub id such as 'wikitext', or a local "
                "folder), split --eval_split, column --eval_text_column."})
    eval_dataset_config_name: str | None = field(default=None, metadata={
        "help": "The configuration of eval_dataset_name (e.g. 'wikitext-2-raw-v1')."})
    eval_split: str = field(default="test", metadata={"help": "The split of eval_dataset_name to evaluate on."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Perplexity on a local file (.txt: the whole file as one text; .json/.jsonl/.csv/.parquet: "
                "the rows of --eval_text_column)."})
    eval_text_column: str = field(default="text", metadata={
        "help": "The column of the evaluation dataset or file that holds the text."})
    eval_convention: str = field(default="field", metadata={
        "help": "How the evaluation dataset is scored. 'field' (the pruning literature's WikiText-2 protocol, "
                "SparseGPT/Wanda): all rows joined with blank lines, tokenized once, the whole split cut into "
                "non-overlapping windows of --eval_seqlen tokens, the last partial window dropped. 'documents': "
                "each row a document followed by EOS (as in training), scored like the built-in texts "
                "(eval_max_length, eval_stride, eval_max_tokens)."})
    eval_seqlen: int | None = field(default=None, metadata={
        "help": "Window length of --eval_convention field; default the model's context, at most 2048 (the "
                "papers' 2048 for LLaMA/OPT)."})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-evaluation-harness tasks, groups or presets to score (needs `pip install 'pilot-hf[eval]'`): "
                "'zeroshot7' = boolq rte hellaswag winogrande arc_easy arc_challenge openbookqa (need the Hub); "
                "'pilot_kjv_next_verse' = pilot-hf's own offline task."})
    num_fewshot: int | None = field(default=None, metadata={
        "help": "Few-shot examples per task prompt; default each task's own (0 for the zeroshot7 tasks)."})
    task_limit: float | None = field(default=None, metadata={
        "help": "Score only the first N documents of each task (a fraction < 1: that share). For quick looks; "
                "reported numbers use every document."})
    task_batch_size: int = field(default=8, metadata={"help": "Requests per forward pass of the task evaluation."})
    task_include_path: str | None = field(default=None, metadata={
        "help": "A folder of your own harness task YAML files (the harness's --include_path)."})

    def __post_init__(self):
        if self.eval_texts is None:
            self.eval_texts = [] if self.has_dataset else ["kjv", "pydoc"]
        self.eval_texts = [t for t in self.eval_texts if t.lower() != "none"]
        unknown = [t for t in self.eval_texts if t not in EVALUATION_TEXTS]
        if unknown:
            raise ValueError(f"eval_texts {unknown} are not built-in held-out texts; choose among {EVALUATION_TEXTS} "
                             "(or 'none'). For a dataset of your own use --eval_dataset_name or --eval_file.")
        for name in ("eval_max_tokens", "eval_stride", "eval_seqlen"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)}: give at least 2 tokens (or None).")
        if self.eval_max_length < 2 or self.eval_batch_size < 1 or self.task_batch_size < 1:
            raise ValueError(f"eval_max_length={self.eval_max_length} must be ≥ 2, eval_batch_size="
                             f"{self.eval_batch_size} and task_batch_size={self.task_batch_size} ≥ 1.")
        if self.eval_stride is not None and self.eval_stride > self.eval_max_length:
            raise ValueError(f"eval_stride={self.eval_stride} > eval_max_length={self.eval_max_length} would skip "
                             "tokens; use a stride ≤ the window length.")
        if self.eval_dataset_name is not None and self.eval_file is not None:
            raise ValueError(f"give eval_dataset_name ({self.eval_dataset_name!r}) or eval_file ({self.eval_file!r}), "
                             "not both.")
        if self.eval_file is not None and os.path.splitext(self.eval_file)[1].lower() not in FILE_BUILDERS:
            raise ValueError(f"eval_file={self.eval_file!r} has an unsupported extension; use one of "
                             f"{sorted(FILE_BUILDERS)}.")
        if self.eval_convention not in EVAL_CONVENTIONS:
            raise ValueError(f"eval_convention must be one of {EVAL_CONVENTIONS}, got {self.eval_convention!r}.")
        if self.has_dataset and (self.dataset_label in self.eval_texts or self.dataset_label == "tasks"):
            raise ValueError(f"the evaluation dataset's label {self.dataset_label!r} is also a built-in text in "
                             "eval_texts (or the results' 'tasks' entry); rename the file or drop it from eval_texts.")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot={self.num_fewshot} must be ≥ 0 (or None for each task's default).")
        if self.task_limit is not None and self.task_limit <= 0:
            raise ValueError(f"task_limit={self.task_limit} must be > 0 (or None for every document).")
        if not self.eval_texts and not self.has_dataset and not self.tasks:
            raise ValueError("nothing to evaluate: eval_texts is 'none' and no --eval_dataset_name, --eval_file or "
                             "--tasks is given.")

    @property
    def has_dataset(self) -> bool:
        return self.eval_dataset_name is not None or self.eval_file is not None

    @property
    def dataset_label(self) -> str | None:
        """The evaluation dataset's name in results and tables: the config name when it names the dataset
        ('wikitext-2-raw-v1'), else '<dataset>-<config>'; a file's stem; '-<split>' unless the split is 'test'."""
        if self.eval_file is not None:
            return Path(self.eval_file).stem
        if self.eval_dataset_name is None:
            return None
        base = Path(self.eval_dataset_name.rstrip("/")).name
        config = self.eval_dataset_config_name
        label = config if config and config.startswith(base) else f"{base}-{config}" if config else base
        return label + ("" if self.eval_split == "test" else f"-{self.eval_split}")

    def dataset_source(self) -> dict | None:
        """Where the evaluation dataset comes from, as recorded with its result (and in the model card)."""
        if not self.has_dataset:
            return None
        return {"dataset": self.eval_dataset_name or self.eval_file, "config": self.eval_dataset_config_name,
                "split": self.eval_split if self.eval_dataset_name else None, "file": self.eval_file is not None,
                "convention": self.eval_convention, "text_column": self.eval_text_column}

    def settings(self) -> dict:
        """What the numbers depend on (a sweep compares it on resume): batch sizes and skip_dense_eval are left
        out, and the dataset and task fields when no dataset or task is evaluated (so earlier records match)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("eval_batch_size", "skip_dense_eval",
                                                                  "task_batch_size")}
        for name in (_DATASET_FIELDS if not self.has_dataset else ()) + (_TASK_FIELDS if not self.tasks else ()):
            out.pop(name)
        return out

    def eval_rows(self) -> list[str]:
        """The evaluation dataset's text rows (loaded once)."""
        return _eval_rows(self.eval_dataset_name, self.eval_dataset_config_name, self.eval_split, self.eval_file,
                          self.eval_text_column)

    def check_sources(self) -> None:
        """Every evaluation text, dataset and task can be read here (checked before any model is loaded): the
        built-in texts exist, the dataset is reachable (offline: cached) and loads with its split and column,
        the tasks are known to the harness and their Hub datasets can be reached."""
        for name in self.eval_texts:
            check_builtin_available(name)
        if self.eval_file is not None:
            check_text_file(self.eval_file, "eval_file")
        # Everything that needs the Hub is checked at once, so offline the user reads one paragraph.
        needed, what, hints = [], [], []
        if self.eval_dataset_name is not None and not Path(self.eval_dataset_name).expanduser().exists():
            needed.append((self.eval_dataset_name, self.eval_dataset_config_name))
            what.append(f"--eval_dataset_name {self.eval_dataset_name}")
            hints.append("Offline, evaluate perplexity on a local file (--eval_file) or the built-in texts "
                         "(--eval_texts).")
        if self.tasks:
            from .harness import OFFLINE_TASK_HINT, task_hub_datasets

            task_datasets = task_hub_datasets(self.tasks, self.task_include_path)
            if task_datasets:
                needed += task_datasets
                what.append(f"--tasks {' '.join(self.tasks)}")
                hints.append(OFFLINE_TASK_HINT)
        if needed:
            check_hub_datasets(list(dict.fromkeys(needed)), what=" and ".join(what), offline_hint=" ".join(hints))
        if self.has_dataset:
            self.eval_rows()


@functools.lru_cache(maxsize=2)
def _eval_rows(name, config, split, file, column) -> list[str]:
    return load_eval_rows(name, config, split, file, column)


def dataset_perplexity(model, tokenizer, args: EvalArguments) -> PerplexityResult:
    """Perplexity on the evaluation dataset of `args` by its convention (EvalArguments.eval_convention)."""
    ids = eval_token_stream(args.eval_rows(), tokenizer, args.eval_convention)
    if args.eval_convention == "documents":
        ids = ids[:args.eval_max_tokens] if args.eval_max_tokens is not None else ids
        return perplexity(model, ids, max_length=args.eval_max_length, stride=args.eval_stride,
                          batch_size=args.eval_batch_size)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqlen = args.eval_seqlen or min(context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    windows = len(ids) // seqlen
    if windows == 0:
        raise ValueError(f"the evaluation dataset has {len(ids)} tokens, fewer than one window of eval_seqlen="
                         f"{seqlen}; lower --eval_seqlen.")
    # The field's loop: nsamples = numel // seqlen windows, each scoring its seqlen - 1 predicted tokens.
    return perplexity(model, ids[:windows * seqlen], max_length=seqlen, stride=seqlen,
                      batch_size=args.eval_batch_size)


def evaluate_model(model, tokenizer, args: EvalArguments) -> dict[str, dict]:
    """Held-out perplexity on each of `args.eval_texts` and on the evaluation dataset (under its
    `dataset_label`, with a 'source' entry), as JSON-ready dicts. Tasks: `evaluate_model_tasks`."""
    results = heldout_perplexity(model, tokenizer, args.eval_texts, max_tokens=args.eval_max_tokens,
                                 max_length=args.eval_max_length, stride=args.eval_stride,
                                 batch_size=args.eval_batch_size)
    out = {name: r.to_dict() for name, r in results.items()}
    if args.has_dataset:
        out[args.dataset_label] = {**dataset_perplexity(model, tokenizer, args).to_dict(),
                                   "source": args.dataset_source()}
    return out


def evaluate_model_tasks(model, tokenizer, args: EvalArguments) -> dict | None:
    """The harness tasks of `args` on `model` as JSON-ready TaskResults (None when no tasks are given)."""
    if not args.tasks:
        return None
    from .harness import evaluate_tasks

    results, _ = evaluate_tasks(model, tokenizer, args.tasks, num_fewshot=args.num_fewshot, limit=args.task_limit,
                                batch_size=args.task_batch_size, include_path=args.task_include_path)
    return results.to_dict()


def load_perplexity_metric(**kwargs):
    """This package's `evaluate` perplexity metric (from its folder, never the Hub)."""
    import evaluate

    return evaluate.load(PERPLEXITY_METRIC_PATH, **kwargs)
