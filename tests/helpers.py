"""Helpers shared by several test modules (fixtures are in conftest.py): test modules import these from here,
never from one another."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import PLAIN_TRAINING, tiny_model
from datasets import Dataset

import pilot_hf as _package
from pilot_hf import PILoTTrainer, PILoTTrainingArguments

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(_package.__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
_PROGRESS = re.compile(r"\d+%\||\[\d+:\d+[<,]")  # tqdm bars (loading, tokenizing, perplexity) are not messages


# ----- the package's modules ---------------------------------------------------------------------------

def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every Python module shipped in pilot_hf (the metric script included)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


# ----- the command line --------------------------------------------------------------------------------

def pilot_hf(*args, cwd=None, env=ENV):
    """Run `python -m pilot_hf ARGS` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pilot_hf", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def tiny_flags(tiny_dir, out, *extra):
    return ["--model_name_or_path", tiny_dir / "model", "--train_file", tiny_dir / "train.txt", "--block_size", 32,
            "--output_dir", out, "--max_steps", 6, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3,
            "--alpha_update_interval", 2, "--sparsity", 0.5, "--recovery_steps", 2, "--save_strategy", "no",
            "--report_to", "none", "--eval_texts", "pydoc", "--eval_max_tokens", 512, "--eval_max_length", 64,
            "--use_cpu", "--seed", 0, *extra]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.search(line)]


# ----- the trainer -------------------------------------------------------------------------------------

def arithmetic_dataset(n=64, length=32, seed=0):
    """Sequences s, s+d, s+2d, ... (mod 128): learnable by a tiny model in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        s, d = int(torch.randint(0, 128, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        ids = [(s + d * j) % 128 for j in range(length)]
        rows.append({"input_ids": ids, "labels": ids})
    return Dataset.from_list(rows)


def make_args(tmp_path, **kw):
    base = dict(**PLAIN_TRAINING, output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8,
                learning_rate=1e-3, logging_steps=5, report_to=[], save_strategy="no", alpha_update_interval=5,
                use_cpu=True, seed=0, data_seed=0)
    base.update(kw)
    return PILoTTrainingArguments(**base)


def make_trainer(tmp_path, arch="llama", args=None, **kw):
    """A PILoTTrainer on a tiny model and the arithmetic data; `args` (built by the caller) or make_args(**kw)."""
    return PILoTTrainer(model=tiny_model(arch), args=args or make_args(tmp_path, **kw),
                        train_dataset=arithmetic_dataset())


def is_study_cells_config(path: Path) -> bool:
    """A config of scripts/study_cells.py (it names a results file), not of a pilot-hf command."""
    return "results" in yaml.safe_load(path.read_text())
