"""Publish a sparse checkpoint: its model card (README.md) and the push to the Hugging Face Hub.

The card is a Jinja template (`pilot_hf/templates/pilot_model_card.md.j2`, a file of the package)
rendered by `huggingface_hub.ModelCard.from_template`; its YAML metadata is built with `ModelCardData` and `EvalResult`, never by hand. The push goes
through `HfApi.create_repo` + `HfApi.create_commit` with exactly the files `upload_plan` lists (one
commit; hidden files, secrets and symlinks never go up). The token comes from where
huggingface_hub looks (HF_TOKEN, the `hf auth login` cache) and is never written anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .methods import DESCRIPTIONS
from .runs import MARKER_NAME
from .serialization import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    compress_checkpoint,
    is_compressed,
)

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

# Upload everything in the folder except training state and pickles (only safetensors weights go up).
IGNORE_PATTERNS = [".pilot-hf", "checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt",
                   ".git/*", ".cache/*"]
# Never uploaded, whatever else the folder holds: hidden files and folders (.env, .ssh/, .netrc, .git-credentials),
# key and credential files, and symlinks (their targets may lie anywhere on the machine).
SECRET_PATTERNS = ["*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", "id_dsa*",
                   "*credentials*", "*.kdbx"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SECRETS = [
    (re.compile(r"hf_[A-Za-z0-9]{10,}"), "<redacted>"),
    (re.compile(r"(--(?:hub[_-])?token[= ])\S+"), r"\1<redacted>"),
    (re.compile(r"(HF_TOKEN=)\S+"), r"\1<redacted>"),
]


# ----------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------

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


def redact(text: str) -> str:
    """`text` with Hugging Face tokens (and --token / --hub_token / HF_TOKEN= values) replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


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
    on_hub = bool(_HUB_ID.match(info.base_model))
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
    from . import __version__

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
        description += (f" Training started from the {settings['warm_start']} one-shot solution at the target "
                        "sparsity (warm start); pruned weights could regrow.")
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


# ----------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------

class PushError(RuntimeError):
    """The push could not be done (no token, or the Hub refused); local files are left as they were."""


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]  # (path in repo, size in bytes), what was (or would be) uploaded
    compressed: bool  # the uploaded weights are in the pilot_sparse format
    dry_run: bool
    commit_url: str | None = None
    left_out: list[str] = field(default_factory=list)  # hidden, secret-looking or linked paths, never uploaded

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        width = max([len(name) for name, _ in self.files] + [4])
        what = "would upload" if self.dry_run else "uploaded"
        target = self.repo_id + (f"@{self.revision}" if self.revision else "")
        lines = [f"{what} {len(self.files)} files ({_size(self.total_bytes)}) to {target}"
                 + (" [compressed]" if self.compressed else "")]
        lines += [f"  {name:<{width}}  {_size(size):>10}" for name, size in self.files]
        if self.left_out:
            lines.append(f"left out (hidden, secret or linked; never uploaded): {', '.join(self.left_out)}")
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {'KMGT'[exp - 1]}B"


def check_pilot_output(folder: str | Path) -> None:
    """A folder pilot-hf can push: config.json and safetensors weights (single file or complete shards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the output_dir a pilot-hf run (or save_pretrained) wrote.")
    missing = []
    if not (folder / CONFIG_NAME).is_file():
        missing.append(CONFIG_NAME)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [f"{s} (listed in {SAFE_WEIGHTS_INDEX_NAME})" for s in shards if not (folder / s).is_file()]
    elif not (folder / SAFE_WEIGHTS_NAME).is_file():
        missing.append(f"model weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} with its shards)")
    if missing:
        raise ValueError(f"{folder} is not a pilot-hf output folder: missing {', '.join(missing)}. Save the model "
                         "there with model.save_pretrained(folder) or pilot_hf.serialization.save_compressed(model, "
                         "folder) first.")


def check_repo_id(repo_id: str) -> None:
    error = None
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        error = "it must be exactly 'namespace/name'"
    else:
        try:
            validate_repo_id(repo_id)
        except ValueError as err:
            error = str(err)
    if error:
        raise ValueError(f"repo_id {repo_id!r} is not valid: {error}. Use 'namespace/name', e.g. "
                         "'your-username/smollm2-135m-pilot-50' (letters, digits, '-', '_', '.').")


def _never_uploaded(path: Path) -> bool:
    return path.is_symlink() or path.name.startswith(".") or any(fnmatch(path.name, p) for p in SECRET_PATTERNS)


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path, bytes) of every file under `folder` that an upload sends: not hidden, secret-looking or a symlink
    (nor inside such a folder), then after IGNORE_PATTERNS."""
    return _plan(Path(folder))[0]


def _plan(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(upload_plan, the paths left out as hidden, secret or linked)."""
    files, left_out = [], []
    for root, dirs, names in os.walk(folder):  # followlinks=False: a linked folder is never entered
        for name in sorted([*dirs, *names]):
            path = Path(root) / name
            if _never_uploaded(path):
                left_out.append(path.relative_to(folder).as_posix())
                if name in dirs:
                    dirs.remove(name)
            elif name in names:
                files.append(path.relative_to(folder).as_posix())
    kept = filter_repo_objects(sorted(files), ignore_patterns=IGNORE_PATTERNS)
    return [(p, (folder / p).stat().st_size) for p in kept], sorted(left_out)


def _retry_hint(folder: Path, repo_id: str, private: bool, compressed: bool, revision: str | None) -> str:
    flags = "".join([" --private" if private else "", " --compressed" if compressed else "",
                     f" --revision {revision}" if revision else ""])
    return f"pilot-hf push {folder} --repo_id {repo_id}{flags}"


def push_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, compressed: bool = False,
                revision: str | None = None, dry_run: bool = False, api: HfApi | None = None,
                commit_message: str | None = None) -> PushResult:
    """Upload a pilot-hf output folder to the Hub repo `repo_id` (created if needed) in one commit.

    compressed=True uploads a compressed copy built in a temporary folder (`output_dir` is never
    modified); a folder that is already compressed is uploaded as it is. dry_run=True checks
    everything but the token, prints and returns the files that would be uploaded, and contacts
    nobody. `api` defaults to `HfApi()`; the token is the one huggingface_hub finds (HF_TOKEN, or
    `hf auth login`). Raises ValueError for bad inputs and PushError if the push fails.
    """
    folder = Path(output_dir)
    check_pilot_output(folder)
    check_repo_id(repo_id)
    if not dry_run and not (getattr(api, "token", None) or get_token()):
        raise PushError("No Hugging Face token found. Log in with `hf auth login` (or set the HF_TOKEN environment "
                        "variable to a token with write access, see https://huggingface.co/settings/tokens), "
                        "then run the push again.")
    compressed_on_disk = is_compressed(folder)
    never_uploaded = _plan(folder)[1]
    with contextlib.ExitStack() as stack:
        upload_dir = folder
        if compressed and not compressed_on_disk:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pilot-push-")))
            upload_dir = tmp / folder.name
            compress_checkpoint(folder, upload_dir)  # its card copy says how to load it
            for name in never_uploaded:  # the copy made linked files real ones: leave out what the folder does
                if (upload_dir / name).is_file():
                    (upload_dir / name).unlink()
        files, left_out = _plan(upload_dir)
        left_out = sorted({*left_out, *never_uploaded} - {MARKER_NAME})
        result = PushResult(repo_id=repo_id, revision=revision, files=files, compressed=is_compressed(upload_dir),
                            dry_run=dry_run, left_out=left_out)
        if dry_run:
            return result
        api = api or HfApi()
        message = commit_message or f"Upload {'compressed ' if result.compressed else ''}sparse model (pilot-hf)"
        step = "create the repository"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                step = f"create the branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            step = "upload the files"
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(upload_dir / name))
                          for name, _ in result.files]  # exactly the plan: never a file the plan left out
            commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=message,
                                       revision=revision, repo_type="model")
        except Exception as err:
            raise PushError(
                f"Pushing {folder} to {repo_id} failed while trying to {step}: {type(err).__name__}: {err}. "
                f"Every local file in {folder} is unchanged and no partial commit was made (the upload is one "
                f"commit). Fix the cause (network, permissions, repo name) and retry the same push: "
                f"`{_retry_hint(folder, repo_id, private, compressed, revision)}`.") from err
        result.commit_url = getattr(commit, "commit_url", None) or str(commit)
        return result
