"""The checks behind scripts/gpu_check.sh: one GPU vs FSDP2 on every visible GPU, then 2:4 kernels vs dense.

    scripts/gpu_check.sh [--steps 300] [--model smollm2-135m] [--out outputs/gpu-check] [--dry-run]

1. Compress SmolLM2-135M (the offline copy by default) to 2:4 with PILoT in bf16 (autocast, fp32 master
   weights) for --steps steps with recovery, on one GPU.
2. The same run with FSDP2 (configs/accelerate/fsdp.yaml) on all visible GPUs (skipped with one GPU). Both
   train on the same G blocks, one global batch per step (G = --global-batch, split over the processes), so
   every step sees the same samples; the α history, the exact sparsity and the zero pattern must agree, the
   merged weights and the perplexity must be close (bf16: reductions in another order round differently).
3. The 2:4 result of step 1 in bf16: every target weight must keep 2 of every 4 inputs; each is converted with
   `torch.sparse.to_sparse_semi_structured` and the model's logits compared with dense; then one forward pass
   of --seq-len tokens is timed at batch 1 and 64, dense against 2:4 (CUDA events, median of --repeats).

One table at the end; the exit status is 1 if any check failed, 2 for a setup error.
--dry-run runs every step that does not need CUDA on this machine: a tiny Llama on CPU, step 2 with two CPU
processes over gloo (tests/launch_fsdp_on_cpu.py), step 3's 2:4 check and the dense timing (the 2:4
conversion needs CUDA and is reported as not run). It proves the script's own logic, not the GPU paths.
This script was written against torch 2.13's API and never executed on a GPU by this project.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pilot_hf (the dry run's tiny model: pilot_hf.testing)


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, check: str, value: str, ok: bool | None) -> None:
        self.rows.append((check, value, "ok" if ok else ("not run" if ok is None else "MISMATCH")))

    @property
    def failed(self) -> bool:
        return any(status == "MISMATCH" for *_, status in self.rows)

    def print(self) -> None:
        widths = [max(len(r[i]) for r in [("check", "value", "status"), *self.rows]) for i in range(3)]
        for i, row in enumerate([("check", "value", "status"), *self.rows]):
            print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
            if i == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model folder, Hub id or the offline 'smollm2-135m'")
    p.add_argument("--dataset", default="builtin:kjv", help="--dataset_name for pilot-hf compress")
    p.add_argument("--steps", type=int, default=None, help="default 300 (--dry-run: 12)")
    p.add_argument("--recovery-steps", type=int, default=None, help="default: a fifth of --steps")
    p.add_argument("--global-batch", type=int, default=None,
                   help="training blocks per step, over all processes (default 64; --dry-run: 8)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu-check")
    p.add_argument("--dry-run", action="store_true", help="CPU only: a tiny model, gloo, no 2:4 kernels")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (12 if args.dry_run else 300)
    args.global_batch = args.global_batch if args.global_batch is not None else (8 if args.dry_run else 64)
    if args.steps < 2:
        p.error(f"--steps {args.steps}: needs at least 2 (some sparsification, some recovery).")
    args.recovery_steps = args.steps // 5 if args.recovery_steps is None else args.recovery_steps
    if not 0 <= args.recovery_steps < args.steps:
        p.error(f"--recovery-steps {args.recovery_steps} must be in [0, --steps).")
    if args.global_batch < 1 or any(b < 1 for b in args.batches) or args.seq_len < 1 or args.repeats < 1:
        p.error("--global-batch, --batches, --seq-len and --repeats must be positive.")
    return args


def setup_error(message: str):
    print(message, file=sys.stderr)
    sys.exit(2)


def setup(args) -> tuple[int, str]:
    """(processes for the FSDP run, device type); exits 2 with the reason when this machine cannot run it."""
    if args.dry_run:
        return 2, "cpu"
    if not torch.cuda.is_available():
        setup_error("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a CUDA "
                 "machine, or pass --dry-run to check the script on CPU.")
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 0):
        setup_error(f"gpu_check: GPU 0 has compute capability {major}.{minor}; 2:4 sparse kernels and bf16 need 8.0 "
                 "(Ampere) or newer.")
    count = torch.cuda.device_count()
    if args.global_batch % count:
        setup_error(f"gpu_check: --global-batch {args.global_batch} does not split over {count} GPUs; pass a multiple.")
    return count, "cuda"


def tiny_model(folder: Path) -> tuple[str, str]:
    """The dry run's model (a Llama with shapes 2:4 conversion accepts) and training text."""
    from pilot_hf.testing import save_tiny_llama

    text = "\n\n".join(f"Verse {i}: and the quick brown fox went over the lazy dog {i % 7} times." for i in range(400))
    save_tiny_llama(folder, text, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                    tie_word_embeddings=True)
    return str(folder / "model"), str(folder / "train.txt")


def _first_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[0] if visible else "0"


def compress_flags(args, model: str, data: list[str], out: Path, per_device: int, device: str) -> list[str]:
    flags = ["--model_name_or_path", model, *data, "--output_dir", str(out), "--overwrite_output_dir",
             "--sparsity_pattern", "2:4", "--max_steps", str(args.steps), "--recovery_steps", str(args.recovery_steps),
             "--max_train_samples", str(args.global_batch), "--per_device_train_batch_size", str(per_device),
             "--block_size", str(args.block_size), "--alpha_update_interval", str(max(args.steps // 30, 2)),
             "--learning_rate", "1e-4", "--mask_learning_rate", "1e-3", "--logging_steps", str(max(args.steps // 10, 1)),
             "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--eval_texts", "pydoc",
             "--eval_max_tokens", "4096", "--eval_max_length", str(min(args.block_size, 256))]
    return flags + (["--use_cpu"] if device == "cpu" else ["--bf16", "true"])


def run(cmd: list[str], log: Path, **env_changes: str) -> None:
    print("$", " ".join(f"{k}={v}" for k, v in env_changes.items()), " ".join(cmd), flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **env_changes}
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        sys.exit(f"gpu_check: this command failed (exit {done.returncode}); its output is in {log}")


def compare(one: Path, many: Path, processes: int, table: Table) -> None:
    from safetensors.torch import load_file

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, many))
    table.add(f"α history, 1 vs {processes} processes", f"{len(m1['alpha_history'])} decisions",
              m1["alpha_history"] == m2["alpha_history"])
    s1, s2 = m1["sparsity_report_total"], m2["sparsity_report_total"]
    table.add("zeros in target weights", f"{s1['zeros']:,} vs {s2['zeros']:,} of {s1['numel']:,}",
              s1 == s2 and s1["zeros"] * 2 == s1["numel"])
    w1, w2 = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
    report = json.loads((one / "sparsity_report.json").read_text())["layers"]
    same_keys = sorted(w1) == sorted(w2)
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) / max(float(w1[k].float().abs().max()), 1e-12)
                for k in w1) if same_keys else float("inf")
    table.add("merged weights, max |Δ| / max |W|", f"{worst:.2e}", same_keys and worst <= 2e-2)
    targets = [f"{n}.weight" for n in report]
    agree = sum(int(((w1[k] == 0) == (w2[k] == 0)).sum()) for k in targets) / sum(w1[k].numel() for k in targets)
    table.add("same zero pattern", f"{agree:.4%} of entries", agree >= 0.99)
    p1, p2 = m1["sparse"]["pydoc"]["perplexity"], m2["sparse"]["pydoc"]["perplexity"]
    table.add("pydoc perplexity", f"{p1:.3f} vs {p2:.3f}", abs(p1 - p2) <= 0.01 * p1)


def time_forward(model, x, repeats: int, device: str) -> float:
    """Median milliseconds of one forward pass."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sparse_kernels(args, result: Path, device: str, table: Table) -> None:
    import transformers as T

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = T.AutoModelForCausalLM.from_pretrained(result, dtype=dtype).to(device).eval()
    names = json.loads((result / "sparsity_report.json").read_text())["layers"]
    layers = {n: model.get_submodule(n) for n in names}
    bad = [n for n, layer in layers.items()
           if int((layer.weight.reshape(layer.weight.shape[0], -1, 4) != 0).sum(-1).max()) > 2]
    table.add("2:4 structure (≤ 2 non-zeros per 4 inputs)", f"{len(layers) - len(bad)}/{len(layers)} layers", not bad)
    x = {b: torch.randint(0, model.config.vocab_size, (b, args.seq_len), device=device,
                          generator=torch.Generator(device).manual_seed(b)) for b in args.batches}
    dense_ms = {b: time_forward(model, x[b], args.repeats, device) for b in args.batches}
    if device != "cuda":
        for b in args.batches:
            table.add(f"forward, batch {b} × {args.seq_len}", f"dense {dense_ms[b]:.2f} ms (CPU); 2:4 needs CUDA", None)
        return
    with torch.inference_mode():
        reference = model(x[args.batches[0]]).logits.float()
    from torch.sparse import to_sparse_semi_structured

    for layer in layers.values():
        layer.weight = torch.nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    with torch.inference_mode():
        logits = model(x[args.batches[0]]).logits.float()
    diff = float((logits - reference).abs().max()) / max(float(reference.abs().max()), 1e-12)
    table.add("logits, 2:4 kernels vs dense (bf16)", f"max |Δ| / max = {diff:.2e}", diff <= 2e-2)
    for b in args.batches:
        sparse_ms = time_forward(model, x[b], args.repeats, device)
        table.add(f"forward, batch {b} × {args.seq_len}",
                  f"dense {dense_ms[b]:.2f} ms, 2:4 {sparse_ms:.2f} ms, speedup {dense_ms[b] / sparse_ms:.2f}x", True)


def main(argv=None) -> int:
    args = parse_args(argv)
    processes, device = setup(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["HF_HUB_OFFLINE"] = "1"
        model, text = tiny_model(args.out)
        data = ["--train_file", text]
    else:
        model, data = args.model, ["--dataset_name", args.dataset]
    table = Table()
    one, many = args.out / "one-process", args.out / f"fsdp-{processes}"
    run([sys.executable, "-m", "pilot_hf", "compress",
         *compress_flags(args, model, data, one, args.global_batch, device)], args.out / "one-process.log",
        **({"CUDA_VISIBLE_DEVICES": _first_gpu()} if device == "cuda" else {}))  # else Trainer takes DataParallel
    if processes > 1:
        launcher = REPO / ("tests/launch_fsdp_on_cpu.py" if device == "cpu" else "scripts/compress.py")
        config = REPO / "configs" / "accelerate" / ("cpu_fsdp_2proc.yaml" if device == "cpu" else "fsdp.yaml")
        run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
             "--num_processes", str(processes), *([] if device == "cpu" else ["--mixed_precision", "bf16"]),
             str(launcher), *compress_flags(args, model, data, many, args.global_batch // processes, device)],
            args.out / f"fsdp-{processes}.log")
        compare(one, many, processes, table)
    else:
        table.add("FSDP on all visible GPUs", "one GPU visible", None)
    sparse_kernels(args, one, device, table)
    print()
    table.print()
    if args.dry_run:
        print("\n(dry run: tiny model on CPU; nothing here ran on a GPU)")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
