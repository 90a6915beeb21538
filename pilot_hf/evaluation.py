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

import inspect
import math
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
    check_builtin_available,
    encode_documents,
    encode_text,
    evaluation_tokens,
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


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    # In slices of ~16 MB of fp32 logits: a whole window's log-softmax (100 MB for a 49k vocabulary) runs
    # from main memory and costs ~3x more on CPU than slices that stay in cache.
    rows = max(1, (1 << 22) // logits.shape[-1])
    return sum(F.cross_entropy(logits[i:i + rows].float(), targets[i:i + rows], reduction="sum").item()
               for i in range(0, len(targets), rows))


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
                for row, (b, e, f) in enumerate(batch):
                    # logits at window position p predict token p + 1; the last kept position predicts nothing
                    scored = e - f
                    nll_sum += _nll_sum(logits[row, keep - 1 - scored: keep - 1], input_ids[row, f - b:])
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


@dataclass
class EvalArguments:
    """Held-out perplexity, before and after compression."""

    eval_texts: list[str] = field(default_factory=lambda: ["kjv", "pydoc"], metadata={
        "help": f"Built-in held-out texts to evaluate on ({', '.join(EVALUATION_TEXTS)}); never trained on."})
    eval_max_tokens: int | None = field(default=8192, metadata={
        "help": "Evaluate on the first N tokens of each text (None: all of it)."})
    eval_max_length: int = field(default=512, metadata={"help": "Sliding-window length (tokens)."})
    eval_stride: int | None = field(default=None, metadata={
        "help": "Tokens between window starts; default eval_max_length (no overlap)."})
    eval_batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    skip_dense_eval: bool = field(default=False, metadata={"help": "Do not evaluate the model before compression."})

    def __post_init__(self):
        unknown = [t for t in self.eval_texts if t not in EVALUATION_TEXTS]
        if unknown:
            raise ValueError(f"eval_texts {unknown} are not built-in held-out texts; choose among {EVALUATION_TEXTS}.")
        for name in ("eval_max_tokens", "eval_stride"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)}: give at least 2 tokens (or None).")
        if self.eval_max_length < 2 or self.eval_batch_size < 1:
            raise ValueError(f"eval_max_length={self.eval_max_length} must be ≥ 2 and eval_batch_size="
                             f"{self.eval_batch_size} ≥ 1.")
        if self.eval_stride is not None and self.eval_stride > self.eval_max_length:
            raise ValueError(f"eval_stride={self.eval_stride} > eval_max_length={self.eval_max_length} would skip "
                             "tokens; use a stride ≤ the window length.")

    def check_sources(self) -> None:
        """Every evaluation text can be read here (checked before any model is loaded)."""
        for name in self.eval_texts:
            check_builtin_available(name)


def evaluate_model(model, tokenizer, args: EvalArguments) -> dict[str, dict]:
    """Held-out perplexity on each of `args.eval_texts`, as JSON-ready dicts."""
    results = heldout_perplexity(model, tokenizer, args.eval_texts, max_tokens=args.eval_max_tokens,
                                 max_length=args.eval_max_length, stride=args.eval_stride,
                                 batch_size=args.eval_batch_size)
    return {name: r.to_dict() for name, r in results.items()}


def load_perplexity_metric(**kwargs):
    """This package's `evaluate` perplexity metric (from its folder, never the Hub)."""
    import evaluate

    return evaluate.load(PERPLEXITY_METRIC_PATH, **kwargs)
