"""Benchmark the core pipeline on the real SmolLM2-135M: load -> wrap -> prune 50% -> merge -> save -> reload.

For each pattern (unstructured 50%, 2:4) the wrapped copy of the loaded model is pruned, merged into a plain
Transformers model, saved with save_pretrained, and reloaded with AutoModelForCausalLM in a fresh Python
process that is not allowed to import pilot_hf. The reloaded logits and zero positions must equal the
in-process ones exactly; any mismatch (or inexact sparsity, or a wrap that changes the logits) exits 1.

Run it alone on the machine (it loads a 135M-parameter model):
    flock /tmp/pilot-heavy.lock .venv/bin/python scripts/bench_core.py
On a shared machine add OMP_NUM_THREADS=1: with other processes busy, PyTorch's spinning OpenMP threads
inflate wrap/prune times ~10-25x (measured here: wrap 13 s vs 0.3 s, unstructured prune 36 s vs 1.4 s).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pilot_hf import find_target_layers, merge_and_unload, prune_model, sparsity_report, wrap_model
from pilot_hf.assets import load_demo_model

PATTERNS = [("unstructured", 0.5), ("2:4", None)]
TEXT = "The King James Bible and the Python documentation are both long English texts that a model can read."
WRAP_TOLERANCE = 1e-4  # max |Δlogit| allowed after wrapping (fp32 rounding of m0 ⊙ w0 only)

# Runs in a fresh interpreter: plain Transformers only, pilot_hf import blocked.
RELOAD = r"""
import hashlib, json, sys, time
class NoPilot:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pilot_hf":
            raise ImportError("the reloaded model must not need pilot_hf")
sys.meta_path.insert(0, NoPilot())
start = time.perf_counter()
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
folder, ids, names = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
loaded = time.perf_counter()
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.contiguous()
save_file({"logits": logits}, folder + "/reloaded_logits.safetensors")
modules = dict(model.named_modules())
zeros = {n: hashlib.sha256((modules[n].weight == 0).numpy().tobytes()).hexdigest() for n in names}
assert "pilot_hf" not in sys.modules, "pilot_hf was imported"
print(json.dumps({"zeros": zeros, "load_s": loaded - start}))
"""


def zero_hashes(model, names):
    modules = dict(model.named_modules())
    return {n: hashlib.sha256((modules[n].weight == 0).numpy().tobytes()).hexdigest() for n in names}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_pattern(dense_model, input_ids, dense_logits, pattern, sparsity):
    model = copy.deepcopy(dense_model)
    names = list(find_target_layers(model))
    row, problems = {}, []
    _, row["wrap_s"] = timed(lambda: wrap_model(model))
    with torch.no_grad():
        row["wrap_max_abs_dlogit"] = float((model(input_ids).logits - dense_logits).abs().max())
    if row["wrap_max_abs_dlogit"] > WRAP_TOLERANCE:
        problems.append(f"wrapping changed the logits by {row['wrap_max_abs_dlogit']:.3g}")
    keep, row["prune_s"] = timed(lambda: prune_model(model, sparsity, pattern))
    row["sparsity"] = sparsity_report(model)["total"]["sparsity"]  # zeros of m ⊙ w (pruned or already 0)
    for name, k in keep.items():  # SmolLM2's layers are nn.Linear: keep-masks are (out, in)
        if pattern == "2:4":
            exact = bool((k.reshape(-1, 4).sum(dim=1) == 2).all())
        else:
            exact = int((~k).sum()) == round(0.5 * k.numel())
        if not exact:
            problems.append(f"{name}: the {pattern} pattern is not exact")
    _, row["merge_s"] = timed(lambda: merge_and_unload(model))
    with torch.no_grad():
        merged_logits = model(input_ids).logits
    hashes = zero_hashes(model, names)
    with tempfile.TemporaryDirectory() as folder:
        _, row["save_s"] = timed(lambda: model.save_pretrained(folder))
        files = os.listdir(folder)
        if "model.safetensors" not in files:
            problems.append(f"no model.safetensors in {files}")
        row["checkpoint_bytes"] = sum((Path(folder) / f).stat().st_size for f in files)
        proc, row["reload_subprocess_s"] = timed(lambda: subprocess.run(
            [sys.executable, "-c", RELOAD, folder, json.dumps(input_ids.tolist()), json.dumps(names)],
            capture_output=True, text=True, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False))
        if proc.returncode != 0:
            problems.append(f"reload failed: {proc.stderr[-2000:]}")
            return row, problems
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        row["reload_from_pretrained_s"] = result["load_s"]
        from safetensors.torch import load_file
        reloaded = load_file(f"{folder}/reloaded_logits.safetensors")["logits"]
    row["reload_max_abs_dlogit"] = float((reloaded - merged_logits).abs().max())
    if not torch.equal(reloaded, merged_logits):
        problems.append(f"reloaded logits differ by up to {row['reload_max_abs_dlogit']:.3g}")
    different = [n for n in names if result["zeros"][n] != hashes[n]]
    row["zero_positions_identical"] = not different
    if different:
        problems.append(f"zero positions differ after reload in {different[:3]}...")
    return row, problems


def main() -> int:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    (model, tokenizer), load_s = timed(load_demo_model)
    model.eval()
    # Older assets.load_demo_model left the GGUF quantizer on the dequantized fp32 model, which makes
    # save_pretrained refuse; the weights are plain tensors, so make sure it is gone.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        dense_logits = model(input_ids).logits
    n_params = sum(p.numel() for p in model.parameters())
    n_target = sum(m.weight.numel() for m in find_target_layers(model).values())
    print(f"SmolLM2-135M: {n_params / 1e6:.1f}M parameters, {n_target / 1e6:.1f}M in target layers; "
          f"input {tuple(input_ids.shape)} tokens", flush=True)

    rows, failures = {}, []
    for pattern, sparsity in PATTERNS:
        row, problems = run_pattern(model, input_ids, dense_logits, pattern, sparsity)
        rows[pattern] = row
        failures += [f"{pattern}: {p}" for p in problems]

    keys = ["wrap_s", "prune_s", "merge_s", "save_s", "reload_subprocess_s", "reload_from_pretrained_s",
            "sparsity", "checkpoint_bytes", "wrap_max_abs_dlogit", "reload_max_abs_dlogit",
            "zero_positions_identical"]
    print(f"\n{'':28s}" + "".join(f"{p:>16s}" for p in rows))
    print(f"{'load_s (GGUF -> fp32)':28s}{load_s:16.2f}")
    for key in keys:
        cells = []
        for row in rows.values():
            value = row.get(key, "n/a")
            if isinstance(value, (bool, str)):
                cells.append(f"{value!s:>16s}")
            elif isinstance(value, int):
                cells.append(f"{value:16d}")
            elif key.endswith("dlogit"):
                cells.append(f"{value:16.3g}")
            else:
                cells.append(f"{value:16.4f}" if key == "sparsity" else f"{value:16.2f}")
        print(f"{key:28s}" + "".join(cells))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nOK: exact sparsity, wrap keeps the logits, reload (without pilot_hf) gives identical logits and zeros")
    return 0


if __name__ == "__main__":
    sys.exit(main())
