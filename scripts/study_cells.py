"""Budget study (issue 29; docs/BENCHMARKS.md section 12): compression cells over methods x sparsities x budgets,
run one at a time, each appended to a JSON-lines results file as soon as it ends (resumable: a cell already
in the file is skipped; a cell in flight when the run stops is lost, nothing else).

    python scripts/study_cells.py --config configs/study/part1.yaml --phase tune  [--commit] [--max_cells N]
    python scripts/study_cells.py --config configs/study/part1.yaml --phase test  [--commit]
    python scripts/study_cells.py --config configs/study/part1.yaml --list        # cells done and left

Phases: `tune` trains every setting of each method's small grid at one budget and sparsity and scores it on
the validation texts only; `test` runs each method with its chosen setting (written into the config by hand
after tuning, with the reason) at every budget and sparsity and scores it once on the test texts. A budget is
a share of the pretrained model's training tokens (pretraining.json beside the model). `--commit` commits the
results file after each cell, so a stopped session loses at most the cell in flight.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

import datasets
import torch
from study_report import read_config  # scripts/ is on the path when a script runs
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

from pilot_hf.data import DataArguments, calibration_blocks, prepare_lm_datasets
from pilot_hf.evaluation import perplexity
from pilot_hf.methods import MethodSpec
from pilot_hf.oneshot import oneshot_prune
from pilot_hf.sweep import parse_cell_sparsity
from pilot_hf.trainer import PILoTTrainer
from pilot_hf.training_args import PILoTTrainingArguments
from pilot_hf.wrapping import sparsity_report

ROOT = Path(__file__).resolve().parent.parent


def load_config(path: Path) -> dict:
    config = read_config(path)
    config["model"] = str(ROOT / config["model"])
    config["data"] = ROOT / config["data"]
    config["results"] = ROOT / config["results"]
    return config


def cells(config: dict, phase: str) -> list[dict]:
    """Every cell of a phase: method, sparsity, budget (share of pretraining tokens), seed, settings."""
    out = []
    if phase == "tune":
        tune = config["tune"]
        for method, grid in tune["grid"].items():
            for settings in grid_settings(grid):
                out.append({"method": method, "sparsity": str(tune["sparsity"]), "budget": tune["budget"],
                            "seed": 0, "settings": settings})
        for method, settings in (tune.get("second_seed") or {}).items():  # a close call, checked in seed 1
            out.append({"method": method, "sparsity": str(tune["sparsity"]), "budget": tune["budget"], "seed": 1,
                        "settings": settings})
    else:
        test = config["test"]  # budget by budget, so that each finished budget is a whole column of the table
        for budget, sparsity, method in itertools.product(test["budgets"], test["sparsities"], test["methods"]):
            for seed in test.get("seeds", {}).get(method, [0]):
                out.append({"method": method, "sparsity": str(sparsity), "budget": budget, "seed": seed,
                            "settings": (test.get("chosen") or {}).get(method, {})})
    for cell in out:
        if not MethodSpec.parse(cell["method"]).trained:
            cell["budget"] = 0.0  # one-shot: no training tokens
            cell["settings"] = {}
    unique = {cell_key(phase, c): {**c, "phase": phase} for c in out}
    return list(unique.values())


def named_methods(only: str | None) -> set[str] | None:
    """The method names of `--only METHOD[,METHOD]` (None: every method)."""
    return None if only is None else {m.strip() for m in only.split(",")}


def select(all_cells: list[dict], only: str | None, sparsity: float | None, seed: int | None,
           budget: float | None = None) -> list[dict]:
    """The cells a run is limited to (all when a filter is None), so that a session can take the cells that
    decide a column first. Method names are matched exactly: 'pilot' is not 'pilot+wanda'."""
    methods = named_methods(only)
    return [c for c in all_cells if (methods is None or c["method"] in methods)
            and (sparsity is None or float(c["sparsity"]) == sparsity)
            and (seed is None or c["seed"] == seed) and (budget is None or c["budget"] == budget)]


def grid_settings(grid: dict | list | None) -> list[dict]:
    """A method's tune settings: a mapping of lists is their product; a list holds mappings of lists, each a
    product of its own (a grid and the points added where its best setting lay on an edge)."""
    if isinstance(grid, list):
        return [settings for part in grid for settings in grid_settings(part)]
    keys = sorted(grid or {})
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_key(phase: str, cell: dict) -> str:
    ident = json.dumps({k: cell[k] for k in ("method", "sparsity", "budget", "seed", "settings")}, sort_keys=True)
    return f"{phase}:{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def read_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def training_arguments(config: dict, cell: dict, steps: int, output_dir: str) -> PILoTTrainingArguments:
    spec = MethodSpec.parse(cell["method"])
    sparsity, pattern = parse_cell_sparsity(cell["sparsity"])
    recovery = math.floor(config["recovery_share"] * steps) if spec.name != "finetune" else 0
    settings = {**config["common"], **cell["settings"]}
    return PILoTTrainingArguments(
        output_dir=output_dir, method=spec.name, warm_start=spec.warm_start, ham=spec.ham,
        sparsity=None if ":" in pattern else sparsity, sparsity_pattern=pattern, max_steps=steps,
        recovery_steps=recovery, per_device_train_batch_size=config["per_device_train_batch_size"],
        seed=cell["seed"], data_seed=cell["seed"], save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, logging_steps=max(1, steps // 20), alpha_update_interval=max(1, steps // 20),
        gmp_interval=max(1, steps // 20), **settings)


def evaluate(model, tokenizer, config: dict, names: list[str]) -> dict[str, float]:
    results = {}
    for name in names:
        ids = tokenizer(config["data"].joinpath(f"{name}.txt").read_text(encoding="utf-8"))["input_ids"]
        results[name] = perplexity(model, ids[: config["eval_max_tokens"]], max_length=config["block_size"],
                                   batch_size=8, progress=False).perplexity
    return results


def run_cell(config: dict, cell: dict, base, tokenizer, blocks) -> dict:
    spec = MethodSpec.parse(cell["method"])
    model = copy.deepcopy(base)
    tokens_per_step = config["per_device_train_batch_size"] * config["block_size"]
    steps = round(cell["budget"] * config["pretraining_tokens"] / tokens_per_step)
    start = time.perf_counter()
    extra = {}
    if spec.trained:
        torch.manual_seed(cell["seed"])
        with tempfile.TemporaryDirectory(prefix="pilot-study-") as tmp:
            args = training_arguments(config, cell, steps, tmp)
            trainer = PILoTTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
            trainer.train()
        model = trainer.model
        extra = {"steps": steps, "tokens_trained": steps * tokens_per_step,
                 "share_of_pretraining": steps * tokens_per_step / config["pretraining_tokens"],
                 "train_log": [h for h in trainer.state.log_history if "loss" in h],
                 "run_settings": json.loads(json.dumps(args.run_settings(), default=str))}
    elif spec.oneshot:
        sparsity, pattern = parse_cell_sparsity(cell["sparsity"])
        calibration = calibration_blocks(blocks, config["common"]["num_calibration_samples"], seed=cell["seed"]) \
            if spec.calibrates else None
        oneshot_prune(model, calibration, method=spec.oneshot, sparsity=None if ":" in pattern else sparsity,
                      pattern=pattern)
    elapsed = time.perf_counter() - start
    names = config["texts"][cell["phase"]]
    return {"key": cell_key(cell["phase"], cell), **cell, **extra, "time_s": elapsed,
            "actual_sparsity": sparsity_report(model)["total"]["sparsity"] if spec.name != "dense" else 0.0,
            "perplexity": evaluate(model, tokenizer, config, names), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def commit(path: Path, message: str) -> None:
    for _ in range(5):  # another git command (a session's commit) may hold the index lock for a moment
        done = subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", message, "--", str(path)],
                              capture_output=True, text=True)
        if done.returncode == 0 or "nothing to commit" in done.stdout + done.stderr:
            return
        if "did not match any file" in done.stderr:  # first cell: the file is new
            subprocess.run(["git", "-C", str(ROOT), "add", "--", str(path)], check=False)
            continue
        time.sleep(3)
    print(f"warning: could not commit {path}: {done.stderr.strip()}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--phase", choices=["tune", "test"], default="tune")
    p.add_argument("--list", action="store_true", help="print the cells done and left, run nothing")
    p.add_argument("--max_cells", type=int, default=None, help="stop after this many cells")
    p.add_argument("--only", default=None, metavar="METHOD[,METHOD]",
                   help="run only these methods (exact names, comma-separated; e.g. pilot,gmp+ham)")
    p.add_argument("--sparsity", type=float, default=None, help="run only cells at this sparsity (e.g. 0.7)")
    p.add_argument("--seed", type=int, default=None, help="run only cells of this seed")
    p.add_argument("--budget", type=float, default=None, help="run only cells of this budget (e.g. 0.25)")
    p.add_argument("--commit", action="store_true", help="git-commit the results file after each cell")
    a = p.parse_args()
    datasets.disable_progress_bars()
    config = load_config(a.config)
    pretraining = json.loads(Path(config["model"], "pretraining.json").read_text())
    config["pretraining_tokens"] = pretraining["tokens_trained"]
    done = read_results(config["results"])
    every = cells(config, a.phase)
    unknown = (named_methods(a.only) or set()) - {c["method"] for c in every}
    if unknown:
        p.error(f"--only names no method of this phase: {', '.join(sorted(unknown))}; "
                f"its methods are {', '.join(sorted({c['method'] for c in every}))}")
    todo = [c for c in select(every, a.only, a.sparsity, a.seed, a.budget) if cell_key(a.phase, c) not in done]
    print(f"{a.phase}: {len(done)} cells in {config['results'].name}, {len(todo)} left", flush=True)
    if a.list:
        for c in todo:
            print("left:", c["method"], c["sparsity"], c["budget"], c["seed"], c["settings"])
        return
    if not todo:
        return
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    base = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    data = DataArguments(train_file=str(config["data"] / "train.txt"), block_size=config["block_size"],
                         validation_split_percentage=0.0)
    blocks = prepare_lm_datasets(data, tokenizer, base)["train"]
    for i, cell in enumerate(todo[: a.max_cells]):
        print(f"[{i + 1}/{len(todo)}] {cell['method']} {cell['sparsity']} budget {cell['budget']} seed "
              f"{cell['seed']} {cell['settings']}", flush=True)
        result = run_cell(config, cell, base, tokenizer, blocks)
        config["results"].parent.mkdir(parents=True, exist_ok=True)
        with config["results"].open("a") as f:
            f.write(json.dumps(result) + "\n")
        print("  ->", {k: round(v, 2) for k, v in result["perplexity"].items()}, f"{result['time_s']:.0f} s",
              flush=True)
        if a.commit:
            commit(config["results"], f"study {config['name']}: {a.phase} cell {cell['method']} "
                                      f"{cell['sparsity']} budget {cell['budget']}")


if __name__ == "__main__":
    main()
