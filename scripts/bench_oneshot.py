"""Benchmark the one-shot baselines on the real SmolLM2-135M (offline): pruning time and held-out perplexity.

    flock /tmp/pilot-heavy.lock .venv/bin/python scripts/bench_oneshot.py --num_samples 64 \
        --patterns unstructured 2:4 --sparsities 0.5 0.7

Calibration: `num_samples` random windows of `seqlen` tokens from the first 60% (by characters) of the
King James Bible. Evaluation: perplexity over `eval_tokens` tokens of the last 20% of the KJV and of
Python's pydoc topics (non-overlapping windows of `eval_window` tokens), on the model as pruned.
The model is loaded once; the target weights are restored between runs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from pilot_hf import find_target_layers
from pilot_hf.assets import builtin_text, load_demo_model
from pilot_hf.oneshot import METHODS, OWLConfig, oneshot_prune


@dataclass
class BenchArguments:
    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt"],
                               metadata={"help": f"One-shot methods to run, among {sorted(METHODS)}."})
    patterns: list[str] = field(default_factory=lambda: ["unstructured"],
                                metadata={"help": "Sparsity patterns: 'unstructured', 'row', 'N:M' (e.g. 2:4)."})
    sparsities: list[float] = field(default_factory=lambda: [0.5],
                                    metadata={"help": "Sparsities for the non-N:M patterns."})
    num_samples: int = field(default=32, metadata={"help": "Calibration samples."})
    seqlen: int = field(default=256, metadata={"help": "Tokens per calibration sample."})
    batch_size: int = field(default=8, metadata={"help": "Calibration samples per forward pass."})
    eval_tokens: int = field(default=20_000, metadata={"help": "Tokens of each held-out text to evaluate."})
    eval_window: int = field(default=512, metadata={"help": "Tokens per (non-overlapping) evaluation window."})
    owl: bool = field(default=False, metadata={"help": "Also run Wanda and SparseGPT with OWL block sparsities."})
    skip_dense: bool = field(default=False, metadata={"help": "Do not evaluate the dense model."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration windows."})
    output: str | None = field(default=None, metadata={"help": "Write the results as JSON to this file."})


def calibration_windows(ids: torch.Tensor, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (num_samples,), generator=generator)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def window_perplexity(model, ids: torch.Tensor, window: int, batch_size: int = 4) -> float:
    """exp(mean NLL) over non-overlapping windows (each window's first token has no context and is not scored)."""
    usable = ids[: ids.numel() // window * window].view(-1, window)
    nll, count = 0.0, 0
    for batch in usable.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum"))
        count += targets.numel()
    return math.exp(nll / count)


def main(argv=None) -> list[dict]:
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t = time.perf_counter()
    model, tokenizer = load_demo_model()
    model.eval()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f} s", flush=True)

    kjv = builtin_text("kjv")
    calib_ids = tokenizer(kjv[: int(0.6 * len(kjv))], return_tensors="pt").input_ids[0]
    calibration_ids = calibration_windows(calib_ids, args.num_samples, args.seqlen, args.seed)
    held_out = {
        "kjv": tokenizer(kjv[int(0.8 * len(kjv)):], return_tensors="pt").input_ids[0][: args.eval_tokens],
        "pydoc": tokenizer(builtin_text("pydoc"), return_tensors="pt").input_ids[0][: args.eval_tokens],
    }
    print(f"calibration {tuple(calibration_ids.shape)}, held-out tokens "
          f"{ {k: v.numel() for k, v in held_out.items()} }", flush=True)

    targets = find_target_layers(model)
    dense = {name: layer.weight.detach().clone() for name, layer in targets.items()}

    def restore():
        with torch.no_grad():
            for name, layer in targets.items():
                layer.weight.copy_(dense[name])

    def evaluate(row: dict) -> dict:
        t = time.perf_counter()
        for name, ids in held_out.items():
            row[f"ppl_{name}"] = window_perplexity(model, ids, args.eval_window)
        row["eval_time_s"] = time.perf_counter() - t
        print(json.dumps(row), flush=True)
        return row

    runs = []
    for pattern in args.patterns:
        for sparsity in ([None] if ":" in pattern else args.sparsities):
            for method in args.methods:
                runs.append((method, pattern, sparsity, None))
                if args.owl and method != "magnitude" and ":" not in pattern:
                    runs.append((method, pattern, sparsity, OWLConfig()))

    results = []
    if not args.skip_dense:
        results.append(evaluate({"method": "dense", "pattern": "-", "sparsity": 0.0, "prune_time_s": 0.0}))
    for method, pattern, sparsity, owl in runs:
        restore()
        report = oneshot_prune(model, calibration_ids, method=method, sparsity=sparsity, pattern=pattern,
                               batch_size=args.batch_size, owl=owl)
        results.append(evaluate({"method": method + ("+owl" if owl else ""), "pattern": pattern,
                                 "sparsity": report.total["sparsity"], "prune_time_s": report.prune_time_s}))

    print(f"\nSmolLM2-135M, calibration {args.num_samples} x {args.seqlen} KJV tokens, "
          f"perplexity on {args.eval_tokens} tokens, windows of {args.eval_window}")
    print("| method | pattern | sparsity | prune time (s) | ppl KJV (held out) | ppl pydoc |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['prune_time_s']:.1f} | "
              f"{r['ppl_kjv']:.2f} | {r['ppl_pydoc']:.2f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
