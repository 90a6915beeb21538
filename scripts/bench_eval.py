"""Throughput of `pilot_hf.evaluation.perplexity` against a bare forward pass on the same batches (SmolLM2-135M).

    flock /tmp/pilot-heavy.lock .venv/bin/python scripts/bench_eval.py --windows 8 --max_length 512

Both sides see the same windows of the held-out KJV text, `batch_size` at a time, under
torch.inference_mode. The bare side only runs `model(input_ids=batch)` (full logits, nothing scored; also timed
with use_cache=False, as the library calls it); the library also computes the NLL. Each side runs `repeats` times, interleaved after one warm-up, and the best
time counts (the machine is shared). Ratio = library tokens/s over bare tokens/s (1.0 = no overhead).
With `--stride` below max_length the windows overlap and the library keeps only the logits it scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from pilot_hf.assets import load_demo_model
from pilot_hf.data import evaluation_tokens
from pilot_hf.evaluation import perplexity, sliding_windows


@dataclass
class BenchArguments:
    windows: int = field(default=8, metadata={"help": "Windows to evaluate (with stride = max_length)."})
    max_length: int = field(default=512, metadata={"help": "Tokens per window."})
    stride: int | None = field(default=None, metadata={"help": "Tokens between window starts (default max_length)."})
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    repeats: int = field(default=3, metadata={"help": "Timed runs of each side (after one warm-up)."})
    text: str = field(default="kjv", metadata={"help": "Built-in text whose held-out part is evaluated."})


def bare_forward_s(model, ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
                   **forward_kwargs) -> float:
    windows = sliding_windows(len(ids), max_length, stride)
    batches = [torch.stack([ids[b:e] for b, e, _ in windows[i:i + batch_size]])
               for i in range(0, len(windows), batch_size)]
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch, **forward_kwargs).logits  # noqa: B018 (the forward is the point)
    return time.perf_counter() - start


def main():
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    stride = args.stride or args.max_length
    model, tokenizer = load_demo_model()
    model.eval()
    # With stride = max_length, `windows` windows need windows * max_length tokens (+ nothing else).
    ids = evaluation_tokens(args.text, tokenizer, max_tokens=args.max_length + (args.windows - 1) * stride)
    kwargs = {"max_length": args.max_length, "stride": stride, "batch_size": args.batch_size, "progress": False}
    n_windows = len(sliding_windows(len(ids), args.max_length, stride))
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, {len(ids)} tokens of held-out {args.text}: "
          f"{n_windows} windows of {args.max_length} (stride {stride}), batch_size {args.batch_size}")

    perplexity(model, ids, **kwargs)  # warm-up
    bare_forward_s(model, ids, args.max_length, stride, args.batch_size)
    library_s, bare_s, bare_nocache_s = [], [], []
    for _ in range(args.repeats):
        result = perplexity(model, ids, **kwargs)
        library_s.append(result.elapsed_s)
        bare_s.append(bare_forward_s(model, ids, args.max_length, stride, args.batch_size))
        bare_nocache_s.append(bare_forward_s(model, ids, args.max_length, stride, args.batch_size, use_cache=False))
    tokens = result.tokens_scored
    print(f"perplexity {result.perplexity:.3f} (nll {result.nll:.4f}, {tokens} tokens scored)")
    print(f"library perplexity: best {min(library_s):.2f} s ({tokens / min(library_s):.0f} tok/s), "
          f"runs {[round(s, 2) for s in library_s]}")
    print(f"bare forward:       best {min(bare_s):.2f} s ({tokens / min(bare_s):.0f} tok/s), "
          f"runs {[round(s, 2) for s in bare_s]}")
    print(f"bare forward, use_cache=False: best {min(bare_nocache_s):.2f} s "
          f"({tokens / min(bare_nocache_s):.0f} tok/s), runs {[round(s, 2) for s in bare_nocache_s]}")
    print(f"throughput ratio library / bare forward: {min(bare_s) / min(library_s):.3f} "
          f"(/ bare forward with use_cache=False: {min(bare_nocache_s) / min(library_s):.3f})")


if __name__ == "__main__":
    main()
