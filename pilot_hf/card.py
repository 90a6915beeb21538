"""The model card (README.md) of a sparse checkpoint, with its per-layer sparsity figure.

The card is a Jinja template (`pilot_hf/templates/pilot_model_card.md.j2`, a file of the package)
rendered by `huggingface_hub.ModelCard.from_template`; its YAML metadata is built with `ModelCardData` and
`EvalResult`, never by hand. `card_info_for_run` is the one builder of a run's card (trained and one-shot
runs alike); the push to the Hub is `hub.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .methods import DESCRIPTIONS
from .naming import is_hub_id, redact
from .version import __version__

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "pilot_model_card.md.j2"
README_NAME = "README.md"
SPARSITY_FIGURE_NAME = "sparsity_layers.png"  # beside sparsity_report.json
HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy"}

CITATION = """@inproceedings{jacobs2025mask,
  title     = {Mask in the Mirror: Implicit Sparsification},
  author    = {Jacobs, Tom and Burkholz, Rebekka},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2408.09966}
}"""

# Licenses of base models pilot-hf ships demos for (their Hub cards say so); any other base model's
# license comes from `info["license"]` or from the README.md of a local base-model folder.
KNOWN_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M": "apache-2.0",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
}


@dataclass
class CardInfo:
    """What the model card says. Plain values only, so a trainer can fill it from its own state."""

    base_model: str  # Hub id (or local path) of the dense model that was sparsified
    sparsity_report: dict  # output of pilot_hf.sparsity_report(model): {"layers": {...}, "total": {...}}
    method: str = "pilot"  # a name of pilot_hf.methods (DESCRIPTIONS) or free text
    hyperparameters: dict = field(default_factory=dict)  # name -> value, shown as a table
    pattern: str | None = None  # "unstructured", "2:4", ...
    results: list[dict] = field(default_factory=list)  # see RESULT_KEYS
    command: str | None = None  # the command that reproduces the run (secrets are redacted)
    model_name: str | None = None  # title and model-index name; default "<base name>-sparse"
    model_id: str | None = None  # Hub id used in the usage snippet; default model_name
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids used for training / evaluation
    license: str | None = None  # default: the base model's, where known
    language: str | list[str] | None = None
    tags: list[str] = field(default_factory=list)  # added to "sparse", "pilot", "pruned"
    compressed: bool = False  # the checkpoint uses the pilot_sparse compressed format
    training_data: str | None = None  # free-text description (e.g. built-in offline text sources)
    method_description: str | None = None  # overrides METHODS' description
    task_results: list[dict] = field(default_factory=list)  # harness task accuracies, see TASK_RESULT_KEYS
    sparsity_figure: str | None = None  # file name (beside README.md) of the per-layer sparsity figure

    # One perplexity result: dataset (Hub id or name), sparse_perplexity required.
    RESULT_KEYS = ("dataset", "dataset_name", "dataset_config", "split", "dense_perplexity", "sparse_perplexity")
    # One task result (lm-evaluation-harness): task, metric ('acc', 'acc_norm') and sparse_value required.
    TASK_RESULT_KEYS = ("task", "metric", "sparse_value", "dense_value", "stderr", "dataset", "dataset_config",
                        "split", "num_fewshot", "harness_version")

    def __post_init__(self):
        report = self.sparsity_report
        if not isinstance(report, dict) or not isinstance(report.get("layers"), dict) or "total" not in report:
            raise ValueError("sparsity_report must be pilot_hf.sparsity_report(model)'s output: "
                             "{'layers': {name: {shape, numel, zeros, sparsity}}, 'total': {numel, zeros, sparsity}}.")
        for i, result in enumerate(self.results):
            unknown = set(result) - set(self.RESULT_KEYS)
            if unknown or "dataset" not in result or "sparse_perplexity" not in result:
                raise ValueError(f"results[{i}] = {result}: give 'dataset' and 'sparse_perplexity' (optional: "
                                 f"{', '.join(self.RESULT_KEYS[1:5])}); unknown keys: {sorted(unknown)}.")
        for i, result in enumerate(self.task_results):
            unknown = set(result) - set(self.TASK_RESULT_KEYS)
            if unknown or not {"task", "metric", "sparse_value"} <= set(result):
                raise ValueError(f"task_results[{i}] = {result}: give 'task', 'metric' and 'sparse_value' (optional: "
                                 f"{', '.join(self.TASK_RESULT_KEYS[3:])}); unknown keys: {sorted(unknown)}.")
        if isinstance(self.tags, str) or isinstance(self.datasets, str):
            raise TypeError("tags and datasets are lists of strings.")

    @classmethod
    def from_dict(cls, info: dict) -> CardInfo:
        known = {f.name for f in fields(cls)}
        unknown = set(info) - known
        if unknown:
            raise ValueError(f"unknown model card fields {sorted(unknown)}; known fields are {sorted(known)}.")
        return cls(**info)


def model_card_template() -> Path:
    """The card template shipped inside the package (pilot_hf/templates/)."""
    return Path(__file__).resolve().parent / "templates" / TEMPLATE_NAME


def base_model_license(base_model: str) -> str | None:
    """The base model's license from a local folder's README.md, else KNOWN_LICENSES (no network)."""
    readme = Path(base_model) / README_NAME
    if readme.is_file():
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    return KNOWN_LICENSES.get(base_model)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_ppl(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def render_model_card(info: CardInfo | dict, template_path: str | Path | None = None) -> ModelCard:
    """Render the model card of a sparse checkpoint (metadata built with ModelCardData / EvalResult)."""
    info = info if isinstance(info, CardInfo) else CardInfo.from_dict(info)
    on_hub = is_hub_id(info.base_model, namespace=True)
    model_name = info.model_name or f"{info.base_model.rstrip('/').split('/')[-1]}-sparse"
    license_ = info.license or base_model_license(info.base_model)

    eval_results = [
        EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=r["dataset"],
                   dataset_name=r.get("dataset_name") or r["dataset"], dataset_config=r.get("dataset_config"),
                   dataset_split=r.get("split"), metric_type="perplexity", metric_name="Perplexity",
                   metric_value=float(r["sparse_perplexity"]))
        for r in info.results
    ] + [
        EvalResult(task_type="text-generation", task_name="Text Generation",
                   dataset_type=r.get("dataset") or r["task"], dataset_name=r["task"],
                   dataset_config=r.get("dataset_config"), dataset_split=r.get("split"),
                   dataset_args={"num_few_shot": r["num_fewshot"]} if r.get("num_fewshot") is not None else None,
                   metric_type=r["metric"], metric_name=_METRIC_NAMES.get(r["metric"], r["metric"]),
                   metric_value=float(r["sparse_value"]),
                   source_name=f"lm-evaluation-harness {r.get('harness_version') or ''}".strip(), source_url=HARNESS_URL)
        for r in info.task_results
    ]
    tags = ["sparse", "pilot", "pruned"] + (["pilot_sparse"] if info.compressed else []) + list(info.tags)
    card_data = ModelCardData(
        base_model=info.base_model if on_hub else None, library_name="transformers", license=license_,
        datasets=list(info.datasets) or None, language=info.language, pipeline_tag="text-generation",
        tags=tags, model_name=model_name, eval_results=eval_results or None,
    )

    report = info.sparsity_report
    layers = [{"name": name, "shape": " x ".join(str(s) for s in row["shape"]), "numel": f"{row['numel']:,}",
               "zeros": f"{row['zeros']:,}", "sparsity": _pct(row["sparsity"])}
              for name, row in report["layers"].items()]
    results = []
    for r in info.results:
        dense, sparse = r.get("dense_perplexity"), float(r["sparse_perplexity"])
        change = "–" if dense is None else f"{100 * (sparse - dense) / dense:+.1f}%"
        name = r.get("dataset_name") or r["dataset"]
        if r.get("dataset_config"):
            name += f" ({r['dataset_config']})"
        results.append({"dataset": _cell(name), "split": _cell(r.get("split") or "–"),
                        "dense": _fmt_ppl(dense), "sparse": _fmt_ppl(sparse), "change": change})
    tasks = []
    for r in info.task_results:
        dense, sparse = r.get("dense_value"), float(r["sparse_value"])
        stderr = f" ± {100 * r['stderr']:.2f}" if r.get("stderr") is not None else ""
        tasks.append({"task": _cell(r["task"]), "metric": _cell(r["metric"]),
                      "shots": r.get("num_fewshot") if r.get("num_fewshot") is not None else "–",
                      "dense": "–" if dense is None else f"{100 * dense:.2f}", "sparse": f"{100 * sparse:.2f}{stderr}",
                      "change": "–" if dense is None else f"{100 * (sparse - dense):+.2f}"})
    harness = sorted({r.get("harness_version") for r in info.task_results if r.get("harness_version")})
    title, description = DESCRIPTIONS.get(info.method.lower(), (info.method, ""))
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or model_card_template()),
        title=model_name,
        model_id=info.model_id or model_name,
        base_model_link=f"[{info.base_model}](https://huggingface.co/{info.base_model})" if on_hub
        else f"`{info.base_model}`",
        license=license_, license_from_base=license_ is not None and not info.license,
        method_title=title, method_description=info.method_description or description,
        hyperparameters=[(_cell(k), "<redacted>" if "token" in str(k).lower() else redact(_cell(v)))
                         for k, v in info.hyperparameters.items()],
        pattern=info.pattern, pattern_text=f"{info.pattern} pattern" if info.pattern else "unstructured",
        command=redact(info.command) if info.command else None,
        results=results, tasks=tasks, harness_version=", ".join(harness) or None, harness_url=HARNESS_URL,
        sparsity_figure=info.sparsity_figure, layers=layers, num_layers=len(layers),
        total_numel=f"{report['total']['numel']:,}", total_zeros=f"{report['total']['zeros']:,}",
        total_sparsity_pct=_pct(report["total"]["sparsity"]),
        compressed=info.compressed, training_data=info.training_data,
        pilot_hf_version=__version__, citation=CITATION,
    )
    return ModelCard(str(card))  # re-parse: what is written is what the Hub will read


def card_info_for_run(settings: dict, sparsity_report: dict, *, base_model: str, results: list[dict] | tuple = (),
                      **fields_) -> CardInfo:
    """The card of a run from its run settings record (`PILoTTrainingArguments.run_settings()`, or a one-shot
    run's settings): the one builder of cards for trained and one-shot runs alike."""
    method = settings["method"]
    description = DESCRIPTIONS.get(method, (method, ""))[1]
    if settings.get("warm_start"):
        fixed = settings.get("keep_zeros")  # the one-shot pattern held for the whole run
        description += (f" Training started from the {settings['warm_start']} one-shot solution at the target "
                        "sparsity (warm start); " + ("its pattern stayed fixed: pruned weights were held at 0."
                                                     if fixed else "pruned weights could regrow."))
    hyperparameters = {k: v for k, v in settings.items() if v is not None and k != "method"}
    fields_.setdefault("method_description", description)
    return CardInfo(base_model=base_model, sparsity_report=sparsity_report, method=method,
                    hyperparameters=hyperparameters, pattern=settings.get("sparsity_pattern"), results=list(results),
                    **fields_)


def write_model_card(output_dir: str | Path, info: CardInfo | dict, template_path: str | Path | None = None,
                     figure: bool = True) -> Path:
    """Render the card and write it to `output_dir/README.md`; returns that path. With `figure` (and the
    `plot` extra installed) the per-layer sparsity figure is drawn beside it first and linked from the card."""
    info = info if isinstance(info, CardInfo) else CardInfo.from_dict(info)
    if figure and info.sparsity_figure is None and \
            write_sparsity_figure(info.sparsity_report, Path(output_dir) / SPARSITY_FIGURE_NAME) is not None:
        info = dataclasses.replace(info, sparsity_figure=SPARSITY_FIGURE_NAME)
    path = Path(output_dir) / README_NAME
    render_model_card(info, template_path).save(path)
    return path


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def sparsity_grid(sparsity_report: dict) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(row labels, column labels, sparsity[row][col]) of the pruned layers: one row per decoder block (the
    first '.<n>.' in a layer's name), one column per projection (the rest of the name, e.g. 'self_attn.q_proj');
    layers outside numbered blocks (e.g. lm_head) get a row of their own. None where a block lacks a column."""
    cells: dict[tuple[str, str], float] = {}
    for name, row in sparsity_report["layers"].items():
        match = _BLOCK_INDEX.search(name)
        key = (match.group(1), name[match.end():]) if match else (name, "")
        cells[key] = row["sparsity"]
    blocks = sorted({b for b, _ in cells if b.isdigit()}, key=int) + sorted({b for b, _ in cells if not b.isdigit()})
    columns = list(dict.fromkeys(c for _, c in cells))
    return blocks, columns, [[cells.get((b, c)) for c in columns] for b in blocks]


def write_sparsity_figure(sparsity_report: dict, path: str | Path) -> Path | None:
    """Draw the per-layer sparsity heat map (blocks x projections, `sparsity_grid`) to `path` (PNG). Needs the
    `plot` extra (matplotlib): without it nothing is drawn, a note is logged and None is returned."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed, so the per-layer sparsity figure %s was not drawn "
                    "(pip install 'pilot-hf[plot]'); sparsity_report.json has the same numbers.", Path(path).name)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, columns, grid = sparsity_grid(sparsity_report)
    if not rows:
        return None
    values = np.array([[np.nan if v is None else 100 * v for v in r] for r in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.5, 0.28 * len(rows) + 1.6))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(columns)), [c.rsplit(".", 1)[-1] or "(layer)" for c in columns], rotation=45,
                  ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 24 else 8)
    ax.set_xlabel("projection")
    ax.set_ylabel("block")
    total = sparsity_report["total"]["sparsity"]
    ax.set_title(f"sparsity per layer (%), {100 * total:.2f}% in total", fontsize=9)
    fig.colorbar(image, ax=ax, label="zeros (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
