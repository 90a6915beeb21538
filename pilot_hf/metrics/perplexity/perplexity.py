"""Perplexity of an in-memory causal LM on texts, as an `evaluate` metric.

Load it from this folder, never from the Hub: `pilot_hf.evaluation.load_perplexity_metric()` or
`evaluate.load("<path to pilot_hf/metrics/perplexity>")`. Unlike the Hub's `perplexity` (which loads a
model by id and scores each text separately), it scores the model object you pass, with the library's
sliding-window recipe: `compute(...)` returns exactly what `pilot_hf.evaluation.perplexity` returns.
"""

import datasets
import evaluate

from pilot_hf.evaluation import perplexity

_DESCRIPTION = """Sliding-window perplexity (https://huggingface.co/docs/transformers/perplexity) of a causal
LM on a list of documents. The documents are tokenized (BOS if the tokenizer adds one) and joined, each
followed by EOS, into one token stream; windows of max_length tokens start every stride tokens and score
only tokens no earlier window scored."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the documents to score.
    model: a causal LM (`transformers.PreTrainedModel`), already loaded.
    tokenizer: its tokenizer (needs an EOS token).
    max_length (`int`, optional): window length; default the model's context, at most 2048.
    stride (`int`, optional): tokens between window starts; default max_length (non-overlapping).
    batch_size (`int`, defaults to 1): windows per forward pass.
    device (optional): where the inputs go; default the model's device.
    progress (`bool`, defaults to False): show a progress bar.
Returns:
    perplexity, nll (mean nats per scored token), tokens_scored, tokens_per_s, elapsed_s, max_length,
    stride, windows.
Example:
    >>> metric = evaluate.load("pilot_hf/metrics/perplexity")
    >>> metric.compute(predictions=texts, model=model, tokenizer=tokenizer, max_length=512)["perplexity"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions, model, tokenizer, max_length=None, stride=None, batch_size=1, device=None,
                 progress=False):
        result = perplexity(model, list(predictions), tokenizer, max_length=max_length, stride=stride,
                            batch_size=batch_size, device=device, progress=progress)
        return result.to_dict()
